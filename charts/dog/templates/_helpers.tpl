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
app.kubernetes.io/managed-by: {{ default .Release.Service .Values.managedBy }}
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
{{- if .root.Values.broker.classicQueues }}
- name: DOG_CLASSIC_QUEUES
  value: "true"
{{- end }}
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

{{/* Seconds in a duration value: a number of seconds, or a string such as 90s, 1h30m, 7d. */}}
{{- define "dog.seconds" -}}
{{- if kindIs "string" . -}}
{{- $units := dict "ns" 0.000000001 "us" 0.000001 "ms" 0.001 "s" 1.0 "sec" 1.0 "m" 60.0 "min" 60.0 "h" 3600.0 "hr" 3600.0 "d" 86400.0 "w" 604800.0 -}}
{{- $total := 0.0 -}}
{{- range regexFindAll "[0-9]+(\\.[0-9]+)?\\s*[a-z]+" . -1 -}}
{{- $n := regexFind "^[0-9]+(\\.[0-9]+)?" . | float64 -}}
{{- $u := regexReplaceAll "^[0-9.]+\\s*" . "" -}}
{{- $total = addf $total (mulf $n (get $units $u)) -}}
{{- end -}}
{{- $total -}}
{{- else -}}
{{- . | float64 -}}
{{- end -}}
{{- end -}}

{{/*
Values that are valid one by one but not together; values.schema.json cannot compare them.
Rendered (as nothing) by the operator Deployment, so `helm install` stops with the message.
*/}}
{{- define "dog.checks" -}}
{{- if and .Values.broker.transientHostMessages (not .Values.broker.classicQueues) -}}
{{- fail "broker.transientHostMessages needs broker.classicQueues: quorum queues persist every message, so it would change nothing" -}}
{{- end -}}
{{- $keepalive := include "dog.seconds" .Values.keepaliveInterval | float64 -}}
{{- $inactive := mulf $keepalive 3 -}}
{{- with .Values.operator.inactiveAfter -}}
{{- $inactive = include "dog.seconds" . | float64 -}}
{{- if le $inactive $keepalive -}}
{{- fail (printf "operator.inactiveAfter (%v) must be longer than keepaliveInterval (%v): every host would turn Inactive between two keepalives" . $.Values.keepaliveInterval) -}}
{{- end -}}
{{- end -}}
{{- if le (include "dog.seconds" .Values.operator.retireAfter | float64) $inactive -}}
{{- fail (printf "operator.retireAfter (%v) must be longer than operator.inactiveAfter (%vs)" .Values.operator.retireAfter $inactive) -}}
{{- end -}}
{{- $port := .Values.broker.port -}}
{{- $url := .Values.broker.agentUrl -}}
{{- if and (not $port) $url -}}
{{- $port = regexFind ":[0-9]+$" (regexReplaceAll "/.*$" (regexReplaceAll "^[a-z]+://([^@/]*@)?" $url "") "") | trimPrefix ":" -}}
{{- if not $port -}}{{- $port = ternary "5671" "5672" (hasPrefix "amqps:" $url) -}}{{- end -}}
{{- end -}}
{{- $wanted := ternary (list ($port | toString)) (list "5671" "5672") (not (empty $port)) -}}
{{- $allowed := false -}}
{{- range splitList "," .Values.operator.failsafe.outbound -}}
{{- $entry := trim . -}}
{{- if regexMatch "^tcp:[0-9]+(-[0-9]+)?(@.*)?$" $entry -}}
{{- $range := regexReplaceAll "@.*$" (trimPrefix "tcp:" $entry) "" | splitList "-" -}}
{{- $lo := first $range | int -}}
{{- $hi := last $range | int -}}
{{- range $wanted -}}
{{- if and (ge (int .) $lo) (le (int .) $hi) -}}{{- $allowed = true -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not $allowed -}}
{{- fail (printf "operator.failsafe.outbound (%q) does not allow the broker port (tcp:%s): agents would cut themselves off from the operator" .Values.operator.failsafe.outbound (join " or tcp:" $wanted)) -}}
{{- end -}}
{{- end -}}
