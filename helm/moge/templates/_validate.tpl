{{/*
Every check on values that the schemas cannot express. Each failure names the value and says
what to do, because `helm install` shows nothing else to the user.
*/}}

{{- define "moge.validate" -}}
{{- $types := list "ClusterIP" "NodePort" "LoadBalancer" -}}
{{- if not (has .Values.service.type $types) -}}
{{- fail (printf "service.type: %q is not one of %s" .Values.service.type (join ", " $types)) -}}
{{- end -}}
{{- range $field := list "runAsUser" "runAsGroup" "fsGroup" -}}
{{- if not (regexMatch "^[1-9][0-9]*$" (toString (index $.Values.podSecurity $field))) -}}
{{- fail (printf "podSecurity.%s: must be a positive id (root, 0, is not allowed), got %v" $field (index $.Values.podSecurity $field)) -}}
{{- end -}}
{{- end -}}
{{- include "moge.validateGroup" (list "attention" .Values.attention) -}}
{{- $pools := include "moge.enabledPools" . | fromYamlArray -}}
{{- if not $pools -}}
{{- fail "expertPools: no pool is enabled; enable at least one (expertPools.<name>.enabled: true)" -}}
{{- end -}}
{{- $kinds := dict -}}
{{- range $entry := $pools -}}
{{- $name := $entry.name -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,48}[a-z0-9])?$" $name) -}}
{{- fail (printf "expertPools.%s: a pool name must be lowercase letters, digits and '-', at most 50 characters (it becomes the KubeRay group expert-<name>)" $name) -}}
{{- end -}}
{{- include "moge.validateGroup" (list (printf "expertPools.%s" $name) $entry.pool) -}}
{{- $_ := set $kinds $entry.pool.accelerator.kind $name -}}
{{- end -}}
{{- if gt (len $kinds) 1 -}}
{{- fail (printf "expertPools: all enabled pools must use one accelerator kind (expert workers share one resource request), found %s" (keys $kinds | sortAlpha | join " and ")) -}}
{{- end -}}
{{- include "moge.validateRedis" . -}}
{{- include "moge.validateMogeConfig" . -}}
{{- if and .Values.apiKeys.existingSecret (or .Values.apiKeys.keys .Values.apiKeys.adminKeys) -}}
{{- fail "apiKeys: set either keys/adminKeys or existingSecret, not both" -}}
{{- end -}}
{{- if and .Values.modelVolume.enabled (not .Values.modelVolume.claimName) -}}
{{- fail "modelVolume.claimName: required when modelVolume.enabled is true" -}}
{{- end -}}
{{- end -}}

{{/* Arguments: (list "path.of.group" $group) */}}
{{- define "moge.validateGroup" -}}
{{- $path := index . 0 -}}
{{- $g := index . 1 -}}
{{- $accel := $g.accelerator | default dict -}}
{{- $kinds := list "cpu" "nvidia" "ascend" -}}
{{- if not (has $accel.kind $kinds) -}}
{{- fail (printf "%s.accelerator.kind: %q is not one of cpu, nvidia (nvidia.com/gpu), ascend (huawei.com/Ascend910)" $path (toString $accel.kind)) -}}
{{- end -}}
{{- if not (regexMatch "^[1-9][0-9]*$" (toString $accel.count)) -}}
{{- fail (printf "%s.accelerator.count: must be a whole number >= 1 (devices per pod), got %v" $path $accel.count) -}}
{{- end -}}
{{- range $field := list "replicas" "minReplicas" "maxReplicas" -}}
{{- if not (regexMatch "^[0-9]+$" (toString (index $g $field))) -}}
{{- fail (printf "%s.%s: must be a whole number >= 0, got %v" $path $field (index $g $field)) -}}
{{- end -}}
{{- end -}}
{{- if or (gt (int $g.minReplicas) (int $g.replicas)) (gt (int $g.replicas) (int $g.maxReplicas)) -}}
{{- fail (printf "%s: need minReplicas <= replicas <= maxReplicas, got %v <= %v <= %v" $path $g.minReplicas $g.replicas $g.maxReplicas) -}}
{{- end -}}
{{- if lt (int $g.maxReplicas) 1 -}}
{{- fail (printf "%s.maxReplicas: must be at least 1" $path) -}}
{{- end -}}
{{- end -}}

{{- define "moge.validateRedis" -}}
{{- $ext := .Values.redis.external -}}
{{- if and .Values.redis.enabled $ext.url -}}
{{- fail "redis: set either redis.enabled (in-chart Redis) or redis.external.url, not both" -}}
{{- end -}}
{{- if and (not .Values.redis.enabled) (not $ext.url) -}}
{{- fail "redis: the controller needs Redis; set redis.enabled: true or redis.external.url" -}}
{{- end -}}
{{- if $ext.url -}}
{{- if not (regexMatch "^rediss?://[^/@\\s]+(:[0-9]+)?(/[0-9]+)?$" $ext.url) -}}
{{- fail (printf "redis.external.url: %q must look like redis://host:port/db or rediss://host:port/db, with no password (put it in redis.external.existingSecret)" $ext.url) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "moge.validateMogeConfig" -}}
{{- $sections := list "model" "engine" "server" "data_plane" "elastic" -}}
{{- range $key, $_ := .Values.moge -}}
{{- if not (has $key $sections) -}}
{{- fail (printf "moge.%s: unknown section; MogeConfig has %s" $key (join ", " $sections)) -}}
{{- end -}}
{{- end -}}
{{- $owned := dict
  "elastic.redis_url" "redis.enabled / redis.external.url"
  "elastic.redis_password" "redis.auth or redis.external.existingSecret (a Secret)"
  "server.api_keys" "apiKeys.keys or apiKeys.existingSecret (a Secret)"
  "server.admin_keys" "apiKeys.adminKeys or apiKeys.existingSecret (a Secret)"
  "data_plane.worker_num_gpus" "expertPools.<name>.accelerator"
  "data_plane.worker_resources" "expertPools.<name>.accelerator"
  "model.device" "attention.accelerator.kind" -}}
{{- range $path, $instead := $owned -}}
{{- $parts := splitList "." $path -}}
{{- $section := index $.Values.moge (index $parts 0) | default dict -}}
{{- if hasKey $section (index $parts 1) -}}
{{- fail (printf "moge.%s: set by the chart; use %s instead" $path $instead) -}}
{{- end -}}
{{- end -}}
{{- $slots := include "moge.expertSlots" . | fromYaml -}}
{{- $dp := .Values.moge.data_plane | default dict -}}
{{- if and (hasKey $dp "num_workers") (gt (int $dp.num_workers) (int $slots.max)) -}}
{{- fail (printf "moge.data_plane.num_workers: %v expert workers do not fit in the pools (at most %v devices: maxReplicas x accelerator.count)" $dp.num_workers $slots.max) -}}
{{- end -}}
{{- $policy := (.Values.moge.elastic | default dict).policy | default dict -}}
{{- if and (hasKey $policy "max_devices") (gt (int $policy.max_devices) (int $slots.max)) -}}
{{- fail (printf "moge.elastic.policy.max_devices: %v is more than the pools can hold (%v devices: maxReplicas x accelerator.count)" $policy.max_devices $slots.max) -}}
{{- end -}}
{{- end -}}
