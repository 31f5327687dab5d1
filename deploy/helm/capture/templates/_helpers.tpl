{{- define "capture.labels" -}}
app.kubernetes.io/name: capture
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
