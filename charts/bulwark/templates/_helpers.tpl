{{/* The chart name. */}}
{{- define "bulwark.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The resource name prefix. */}}
{{- define "bulwark.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "bulwark.controlPlane" -}}
{{- printf "%s-control-plane" (include "bulwark.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "bulwark.webhook" -}}
{{- printf "%s-webhook" (include "bulwark.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Secret of the mesh's issuer: the user's, or the one the chart generates. */}}
{{- define "bulwark.identityIssuer" -}}
{{- default (printf "%s-identity-issuer" (include "bulwark.fullname" .) | trunc 63 | trimSuffix "-") .Values.identity.issuer.secretName }}
{{- end }}

{{/* The names agents dial the control plane's gRPC port by, for its serving certificate. */}}
{{- define "bulwark.controlPlaneNames" -}}
{{- $service := include "bulwark.controlPlane" . }}
{{- $ns := .Release.Namespace }}
{{- join "," (list $service (printf "%s.%s" $service $ns) (printf "%s.%s.svc" $service $ns) (printf "%s.%s.svc.cluster.local" $service $ns)) }}
{{- end }}

{{- define "bulwark.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "bulwark.controlPlane" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "bulwark.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "bulwark.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: bulwark
{{- end }}

{{/* The control plane's selector labels. */}}
{{- define "bulwark.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bulwark.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end }}

{{- define "bulwark.controlPlaneImage" -}}
{{- printf "%s:%s" .Values.controlPlane.image.repository (default .Chart.AppVersion .Values.controlPlane.image.tag) }}
{{- end }}

{{- define "bulwark.agentImage" -}}
{{- printf "%s:%s" .Values.agent.image.repository (default .Chart.AppVersion .Values.agent.image.tag) }}
{{- end }}

{{/* Namespaces the webhook never sees: the configured ones and the release's own. */}}
{{- define "bulwark.excludedNamespaces" -}}
{{- $names := concat (list .Release.Namespace) .Values.webhook.excludedNamespaces | uniq }}
{{- toJson $names }}
{{- end }}
