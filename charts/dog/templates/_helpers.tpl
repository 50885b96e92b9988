{{/* Name prefix of every object. */}}
{{- define "dog.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "dog.labels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dog
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "dog.selectorLabels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dog.image" -}}
{{- printf "%s/%s:%s" .root.Values.image.repository .name (default .root.Chart.AppVersion .root.Values.image.tag) -}}
{{- end -}}

{{- define "dog.brokerSecret" -}}
{{- default (printf "%s-broker" (include "dog.fullname" .)) .Values.broker.existingSecret -}}
{{- end -}}

{{- define "dog.operatorKeySecret" -}}
{{- default (printf "%s-operator-key" (include "dog.fullname" .)) .Values.operatorKey.existingSecret -}}
{{- end -}}

{{- define "dog.publicKeysConfigMap" -}}
{{- default (printf "%s-operator-public-keys" (include "dog.fullname" .)) .Values.operatorPublicKeysConfigMap -}}
{{- end -}}

{{/* Environment shared by operator and agent: topology, sender name, keepalive, TLS files. */}}
{{- define "dog.commonEnv" -}}
- name: DOG_TOPOLOGY_PREFIX
  value: {{ .root.Values.broker.topologyPrefix | quote }}
- name: DOG_OPERATOR_NAME
  value: {{ .root.Values.operatorName | quote }}
- name: DOG_KEEPALIVE_INTERVAL
  value: {{ .root.Values.keepaliveInterval | quote }}
- name: DOG_LOG_FORMAT
  value: {{ .root.Values.logFormat | quote }}
- name: DOG_LOG_LEVEL
  value: {{ .root.Values.logLevel | quote }}
{{- if .root.Values.broker.tls.caSecret }}
- name: DOG_BROKER_CA_FILE
  value: /etc/dog/broker-ca/ca.crt
{{- end }}
{{- if .clientSecret }}
- name: DOG_BROKER_CERT_FILE
  value: /etc/dog/broker-client/tls.crt
- name: DOG_BROKER_KEY_FILE
  value: /etc/dog/broker-client/tls.key
{{- end }}
{{- end -}}

{{- define "dog.tlsVolumeMounts" -}}
{{- if .root.Values.broker.tls.caSecret }}
- name: broker-ca
  mountPath: /etc/dog/broker-ca
  readOnly: true
{{- end }}
{{- if .clientSecret }}
- name: broker-client
  mountPath: /etc/dog/broker-client
  readOnly: true
{{- end }}
{{- end -}}

{{- define "dog.tlsVolumes" -}}
{{- if .root.Values.broker.tls.caSecret }}
- name: broker-ca
  secret:
    secretName: {{ .root.Values.broker.tls.caSecret }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- if .clientSecret }}
- name: broker-client
  secret:
    secretName: {{ .clientSecret }}
    defaultMode: 0440
{{- end }}
{{- end -}}
