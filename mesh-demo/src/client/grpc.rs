//! The gRPC side of the client: `Say` calls on a channel to a `grpc` demo server.

use http::uri::{Authority, Uri};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use super::{CallError, Reply, Target};
use crate::grpc::{
    POD_TRAILER,
    proto::{SayRequest, echo_client::EchoClient},
};

/// A channel to an `Echo` server (h2c) that calls share; clones share it too.
#[derive(Clone, Debug)]
pub struct GrpcClient {
    echo: EchoClient<Channel>,
}

/// What a successful `Say` prints: the reply and the pod the trailer named.
#[derive(Debug, Serialize)]
struct SayJson<'a> {
    pod: &'a str,
    message: &'a str,
    caller: &'a str,
    /// `None` when the trailer did not arrive.
    trailer_pod: Option<&'a str>,
}

impl GrpcClient {
    /// Connects now, rather than on the first call, so a refusal shows here.
    pub async fn connect(target: &Target) -> Result<GrpcClient, CallError> {
        let bad_target = |e: &dyn std::fmt::Display| {
            CallError::Connect(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("`{target}` is not a URI authority: {e}"),
            ))
        };
        let authority: Authority = target.to_string().parse().map_err(|e| bad_target(&e))?;
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query("/")
            .build()
            .map_err(|e| bad_target(&e))?;
        let channel = Endpoint::from(uri)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(CallError::GrpcConnect)?;
        Ok(GrpcClient {
            echo: EchoClient::new(channel),
        })
    }

    /// One `Say` on the shared channel. A status other than OK is a failure; the reply's
    /// text is JSON with `pod`, `message`, `caller` and `trailer_pod`.
    pub async fn say(&self, request: SayRequest) -> Result<Reply, CallError> {
        let response = self.echo.clone().say(request).await?;
        // Tonic merges a unary call's trailers into its metadata.
        let trailer_pod = response
            .metadata()
            .get(POD_TRAILER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let reply = response.into_inner();
        if reply.pod.is_empty() {
            return Err(CallError::BadReply("SayReply names no pod".into()));
        }
        let text = serde_json::to_string(&SayJson {
            pod: &reply.pod,
            message: &reply.message,
            caller: &reply.caller,
            trailer_pod: trailer_pod.as_deref(),
        })
        .map_err(|e| CallError::BadReply(format!("encode the reply: {e}")))?;
        Ok(Reply {
            pod: reply.pod,
            text,
        })
    }
}
