{{/*
The namespace of every namespaced object, and the one the flags name. With
namespace.create the chart owns the Namespace object, so it cannot be the release's own
namespace, which Helm needs to exist before it installs anything.
*/}}
{{- define "mesh.namespace" -}}
{{- if and .Values.namespace.create (eq .Values.namespace.name .Release.Namespace) -}}
{{- fail (printf "namespace.create=true makes the chart create and own Namespace %q, so %q cannot also be the release's namespace (-n): install without -n %s, or create it, label it pod-security.kubernetes.io/enforce=privileged and set namespace.create=false (docs/kubernetes.md#install)" .Values.namespace.name .Values.namespace.name .Values.namespace.name) -}}
{{- end -}}
{{- .Values.namespace.name -}}
{{- end -}}

{{/* Labels of every object. Called with (dict "component" NAME "root" .). */}}
{{- define "mesh.labels" -}}
app.kubernetes.io/name: {{ .component }}
app.kubernetes.io/part-of: mesh
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{/* An image reference, repository:tag, the tag defaulting to the chart's appVersion.
Called with (dict "image" .Values.images.X "root" .). */}}
{{- define "mesh.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{/* The controller's Service name, as agents reach it and its certificate names it. */}}
{{- define "mesh.controllerHost" -}}
{{- printf "mesh-controller.%s.svc" (include "mesh.namespace" .) -}}
{{- end -}}

{{/*
The arguments of `mesh-cni install`, the same for the install-cni init container and the
cni-watch container (which adds --watch): the watcher keeps exactly the entry the init
container chained.
*/}}
{{- define "mesh.cniInstallArgs" -}}
- mesh-cni
- install
- --conf-dir=/host/etc/cni/net.d
- --bin-dir=/host/opt/cni/bin
- --agent-socket=/var/run/mesh/cni/cni.sock
{{- range .Values.cni.excludeNamespaces }}
- --exclude-namespace={{ . }}
{{- end }}
{{- if not (has (include "mesh.namespace" .) .Values.cni.excludeNamespaces) }}
- --exclude-namespace={{ include "mesh.namespace" . }}
{{- end }}
- --uninstall-signal=/etc/podinfo/annotations
{{- end -}}
