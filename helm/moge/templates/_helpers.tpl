{{/* Names, labels and the names of the Secrets every other template refers to. */}}

{{- define "moge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Object name prefix; 40 characters leaves room for KubeRay's own suffixes (-head-svc, ...). */}}
{{- define "moge.fullname" -}}
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

{{- define "moge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "moge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "moge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of every Ray pod: the NetworkPolicies and the metrics Service select on them. */}}
{{- define "moge.rayPodSelector" -}}
{{ include "moge.selectorLabels" . }}
app.kubernetes.io/component: ray
{{- end -}}

{{- define "moge.redisSelector" -}}
{{ include "moge.selectorLabels" . }}
app.kubernetes.io/component: redis
{{- end -}}

{{- define "moge.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "moge.redisName" -}}
{{- printf "%s-redis" (include "moge.fullname" .) -}}
{{- end -}}

{{/* The Secret and key holding the Redis password, or "" when Redis has none. */}}
{{- define "moge.redisSecretName" -}}
{{- if .Values.redis.enabled -}}
{{- default (include "moge.redisName" .) .Values.redis.auth.existingSecret -}}
{{- else -}}
{{- .Values.redis.external.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "moge.redisSecretKey" -}}
{{- if .Values.redis.enabled -}}
{{- .Values.redis.auth.existingSecretKey -}}
{{- else -}}
{{- .Values.redis.external.existingSecretKey -}}
{{- end -}}
{{- end -}}

{{- define "moge.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s.%s.svc:6379/0" (include "moge.redisName" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{- define "moge.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "moge.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{- define "moge.rayAuthSecretName" -}}
{{- default (printf "%s-ray-auth" (include "moge.fullname" .)) .Values.rayAuth.existingSecret -}}
{{- end -}}

{{/*
A secret value that survives upgrades: the given one, else the one already in the cluster, else a
new random one. `lookup` is empty during `helm template`, so offline renders get a fresh value.
Arguments: (list $ secretName key givenValue)
*/}}
{{- define "moge.persistentSecretValue" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $key := index . 2 -}}
{{- $given := index . 3 -}}
{{- if $given -}}
{{- $given | b64enc -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace $name -}}
{{- if and $existing (hasKey $existing.data $key) -}}
{{- index $existing.data $key -}}
{{- else -}}
{{- randAlphaNum 32 | b64enc -}}
{{- end -}}
{{- end -}}
{{- end -}}
