{{/* Names, labels and the image reference shared by every template. */}}

{{- define "mortar.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mortar.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: include with (dict "ctx" . "component" "operator"). */}}
{{- define "mortar.selectorLabels" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mortar.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "mortar.csiDriverName" -}}mortar.csi.mortar.dev{{- end -}}

{{/* The node plugin's socket directory on the host; also its --state-dir. */}}
{{- define "mortar.csiPluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.csi.kubeletDir) (include "mortar.csiDriverName" .) -}}
{{- end -}}

{{/* The security context of a container that needs no privilege at all. */}}
{{- define "mortar.restrictedSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Root (the volume's files are owned by many users) but with only the capabilities given. */}}
{{- define "mortar.rootSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsUser: 0
capabilities:
  drop: ["ALL"]
{{- with .add }}
  add: {{ toJson . }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}
