{{/* Labels Helm adds to each object it renders (the selector keeps app.kubernetes.io/name only). */}}
{{- define "endpoints-operator.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "endpoints-operator.config" -}}
instance = {{ .Values.instance | toJson }}
[status]
listen = "0.0.0.0:{{ int .Values.statusPort }}"
[sources]
paths = ["/etc/endpoints-operator/endpoints.d"]
crd = {{ .Values.crd }}
{{- with .Values.namespaces }}
namespaces = {{ toJson . }}
{{- end }}
[leader_election]
enabled = {{ .Values.leaderElection.enabled }}
lease_seconds = {{ int .Values.leaderElection.leaseSeconds }}
{{- with .Values.extraConfig }}
{{ . }}
{{- end }}
{{- end }}
