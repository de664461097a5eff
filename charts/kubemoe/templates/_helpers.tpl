{{/* The release's full name, at most 63 characters. */}}
{{- define "kubemoe.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
The name of what one release makes outside its namespace (ClusterRole, ClusterRoleBinding; the Role
and RoleBinding in watchNamespace): the full name and the release namespace, so that the same release
name in two namespaces does not collide. At most 63 characters: a longer one keeps its first 54 and a
hash of the whole, still unique.
*/}}
{{- define "kubemoe.clusterName" -}}
{{- $name := printf "%s-%s" (include "kubemoe.fullname" .) .Release.Namespace -}}
{{- if le (len $name) 63 -}}
{{- $name -}}
{{- else -}}
{{- printf "%s-%s" ($name | trunc 54 | trimSuffix "-") ($name | sha256sum | trunc 8) -}}
{{- end -}}
{{- end -}}

{{/* The metrics Service's name: a DNS label, so at most 63 characters with its suffix. */}}
{{- define "kubemoe.metricsServiceName" -}}
{{- printf "%s-metrics" (include "kubemoe.fullname" . | trunc 55 | trimSuffix "-") -}}
{{- end -}}

{{- define "kubemoe.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubemoe.labels" -}}
{{ include "kubemoe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "kubemoe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubemoe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}
