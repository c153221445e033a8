{{/*
The Serve config (RayService serveConfigV2) and the MogeConfig inside it. The chart owns the fields
that must agree with the pods it creates: expert worker count and resources, device kind, Redis URL.
*/}}

{{/* Enabled expert pools (a pool without `enabled` is enabled), sorted by name: a YAML list of {name, pool}. */}}
{{- define "moge.enabledPools" -}}
{{- $out := list -}}
{{- range $name := keys .Values.expertPools | sortAlpha -}}
{{- $pool := index $.Values.expertPools $name -}}
{{- if or (not (hasKey $pool "enabled")) $pool.enabled -}}
{{- $out = append $out (dict "name" $name "pool" $pool) -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* Expert slots (devices) over all enabled pools at replicas / minReplicas / maxReplicas. */}}
{{- define "moge.expertSlots" -}}
{{- $start := 0 -}}{{- $min := 0 -}}{{- $max := 0 -}}
{{- range $entry := include "moge.enabledPools" . | fromYamlArray -}}
{{- $count := int $entry.pool.accelerator.count -}}
{{- $start = add $start (mul (int $entry.pool.replicas) $count) -}}
{{- $min = add $min (mul (int $entry.pool.minReplicas) $count) -}}
{{- $max = add $max (mul (int $entry.pool.maxReplicas) $count) -}}
{{- end -}}
{{- toYaml (dict "start" $start "min" $min "max" $max) -}}
{{- end -}}

{{/* The accelerator kind of the expert pools (validated to be one). */}}
{{- define "moge.expertKind" -}}
{{- (index (include "moge.enabledPools" . | fromYamlArray) 0).pool.accelerator.kind -}}
{{- end -}}

{{/*
Custom Ray resources a pod of a group offers, as a dict. Expert pods offer `expert_slot` per
device, which is what every expert worker actor requests; Ascend devices are Ray's `NPU` resource.
Arguments: (list $accelerator isExpertPool)
*/}}
{{- define "moge.rayResources" -}}
{{- $accel := index . 0 -}}
{{- $isExpert := index . 1 -}}
{{- $res := dict -}}
{{- if $isExpert -}}{{- $_ := set $res "expert_slot" (int $accel.count) -}}{{- end -}}
{{- if eq $accel.kind "ascend" -}}{{- $_ := set $res "NPU" (int $accel.count) -}}{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{- define "moge.mogeConfig" -}}
{{- $cfg := deepCopy .Values.moge -}}
{{- range $section := list "model" "engine" "server" "data_plane" "elastic" -}}
{{- if not (index $cfg $section) -}}{{- $_ := set $cfg $section dict -}}{{- end -}}
{{- end -}}
{{- $slots := include "moge.expertSlots" . | fromYaml -}}
{{- $kind := include "moge.expertKind" . -}}
{{- $devices := dict "cpu" "cpu" "nvidia" "cuda" "ascend" "npu" -}}
{{- $_ := set $cfg.model "device" (index $devices .Values.attention.accelerator.kind) -}}
{{- $_ = set $cfg.server "host" "0.0.0.0" -}}
{{- $_ = set $cfg.server "port" (int .Values.serve.port) -}}
{{- if and (eq .Values.attention.accelerator.kind "nvidia") (not (hasKey $cfg.server "replica_num_gpus")) -}}
{{- $_ = set $cfg.server "replica_num_gpus" 1 -}}
{{- end -}}
{{- $dp := $cfg.data_plane -}}
{{- if not (hasKey $dp "num_workers") -}}{{- $_ = set $dp "num_workers" (max 1 (int $slots.start)) -}}{{- end -}}
{{- $_ = set $dp "worker_num_gpus" (ternary 1 0 (eq $kind "nvidia")) -}}
{{- $workerRes := dict "expert_slot" 1 -}}
{{- if eq $kind "ascend" -}}{{- $_ = set $workerRes "NPU" 1 -}}{{- end -}}
{{- $_ = set $dp "worker_resources" $workerRes -}}
{{- $_ = set $cfg.elastic "redis_url" (include "moge.redisUrl" .) -}}
{{- if not $cfg.elastic.policy -}}{{- $_ = set $cfg.elastic "policy" dict -}}{{- end -}}
{{- $policy := $cfg.elastic.policy -}}
{{- if not (hasKey $policy "min_devices") -}}{{- $_ = set $policy "min_devices" (max 1 (int $slots.min)) -}}{{- end -}}
{{- if not (hasKey $policy "max_devices") -}}{{- $_ = set $policy "max_devices" (max 1 (int $slots.max)) -}}{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{- define "moge.serveConfig" -}}
{{- $app := dict
  "name" .Values.serve.appName
  "route_prefix" .Values.serve.routePrefix
  "import_path" "cluster.serve.app:app_builder"
  "args" (dict "config" (include "moge.mogeConfig" . | fromYaml)) -}}
{{- $serve := dict
  "proxy_location" "EveryNode"
  "http_options" (dict "host" "0.0.0.0" "port" (int .Values.serve.port))
  "applications" (list $app) -}}
{{- toYaml $serve -}}
{{- end -}}
