{{/*
The pod template shared by the head, the attention group and every expert pool.
Arguments: dict with root ($), group (values of the group), container ("ray-head" | "ray-worker"),
component (label value: head | attention | expert-<name>), isHead (bool).
*/}}

{{- define "moge.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .runAsUser }}
runAsGroup: {{ int .runAsGroup }}
fsGroup: {{ int .fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "moge.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Environment every Ray process needs: Ray's token and the project's secrets (MOGE_*). */}}
{{- define "moge.rayEnv" -}}
{{- $root := . -}}
- name: XDG_CACHE_HOME
  value: /tmp/cache
{{- if .Values.rayAuth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "moge.rayAuthSecretName" . }}
      key: {{ .Values.rayAuth.existingSecretKey }}
{{- end }}
{{- with include "moge.redisSecretName" . }}
- name: MOGE_ELASTIC__REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "moge.redisSecretKey" $root }}
{{- end }}
{{- if or .Values.apiKeys.keys .Values.apiKeys.existingSecret }}
- name: MOGE_SERVER__API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "moge.apiKeysSecretName" . }}
      key: api-keys
{{- end }}
{{- if or .Values.apiKeys.adminKeys .Values.apiKeys.existingSecret }}
- name: MOGE_SERVER__ADMIN_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "moge.apiKeysSecretName" . }}
      key: admin-keys
      optional: {{ not .Values.apiKeys.adminKeys }}
{{- end }}
{{- end -}}

{{/* CPU/memory from values plus the accelerator as an extended resource (requests = limits). */}}
{{- define "moge.containerResources" -}}
{{- $group := . -}}
{{- $res := deepCopy ($group.resources | default dict) -}}
{{- $accel := $group.accelerator | default (dict "kind" "cpu") -}}
{{- $names := dict "nvidia" "nvidia.com/gpu" "ascend" "huawei.com/Ascend910" -}}
{{- if hasKey $names $accel.kind -}}
{{- $name := index $names $accel.kind -}}
{{- $limits := $res.limits | default dict -}}
{{- $requests := $res.requests | default dict -}}
{{- $_ := set $limits $name (int $accel.count) -}}
{{- $_ = set $requests $name (int $accel.count) -}}
{{- $_ = set $res "limits" $limits -}}
{{- $_ = set $res "requests" $requests -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{- define "moge.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $g := .group -}}
metadata:
  labels:
    {{- include "moge.labels" $root | nindent 4 }}
    app.kubernetes.io/component: ray
    moge.io/group: {{ .component }}
  {{- with $root.Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- if not .isHead }}
  {{- /* Only the head's autoscaler talks to the Kubernetes API. */}}
  automountServiceAccountToken: false
  {{- end }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "moge.podSecurityContext" $root.Values.podSecurity | nindent 4 }}
  containers:
    - name: {{ .container }}
      image: {{ include "moge.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- include "moge.containerSecurityContext" $root | nindent 8 }}
      resources:
        {{- include "moge.containerResources" $g | nindent 8 }}
      env:
        {{- include "moge.rayEnv" $root | nindent 8 }}
        {{- with $g.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        {{- if .isHead }}
        - {name: gcs-server, containerPort: 6379, protocol: TCP}
        - {name: dashboard, containerPort: 8265, protocol: TCP}
        - {name: client, containerPort: 10001, protocol: TCP}
        {{- end }}
        - {name: serve, containerPort: {{ int $root.Values.serve.port }}, protocol: TCP}
        - {name: metrics, containerPort: 8080, protocol: TCP}
      volumeMounts:
        # Ray writes sessions, logs and spilled objects under /tmp; the root filesystem is read-only.
        - {name: tmp, mountPath: /tmp}
        - {name: dshm, mountPath: /dev/shm}
        {{- if $root.Values.modelVolume.enabled }}
        - {name: model, mountPath: {{ $root.Values.modelVolume.mountPath }}, readOnly: true}
        {{- end }}
        {{- with $g.volumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir: {}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $g.shmSize | default "1Gi" }}
    {{- if $root.Values.modelVolume.enabled }}
    - name: model
      persistentVolumeClaim:
        claimName: {{ $root.Values.modelVolume.claimName }}
        readOnly: true
    {{- end }}
    {{- with $g.volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* `ray start --resources` wants a JSON object inside shell quotes: "{\"expert_slot\": 2}". */}}
{{- define "moge.rayStartResources" -}}
{{- printf "\"%s\"" (toJson . | replace "\"" "\\\"") -}}
{{- end -}}

{{/*
One KubeRay worker group. Arguments: dict with root, group, name (groupName), isExpert.
*/}}
{{- define "moge.workerGroup" -}}
{{- $g := .group -}}
{{- $params := include "moge.stringMap" ($g.rayStartParams | default dict) | fromYaml -}}
{{- $res := include "moge.rayResources" (list $g.accelerator .isExpert) | fromYaml -}}
{{- if $res -}}{{- $_ := set $params "resources" (include "moge.rayStartResources" $res) -}}{{- end -}}
{{- if eq $g.accelerator.kind "nvidia" -}}{{- $_ := set $params "num-gpus" (toString (int $g.accelerator.count)) -}}{{- end -}}
{{- $spec := dict
  "groupName" .name
  "replicas" (int $g.replicas)
  "minReplicas" (int $g.minReplicas)
  "maxReplicas" (int $g.maxReplicas)
  "rayStartParams" $params
  "template" (include "moge.rayPodTemplate" (dict "root" .root "group" $g "container" "ray-worker" "component" .name "isHead" false) | fromYaml) -}}
{{- $spec = mergeOverwrite $spec (deepCopy ($g.groupSpecExtras | default dict)) -}}
{{- toYaml $spec -}}
{{- end -}}

{{/* rayStartParams are strings in the CRD; `num-cpus: 4` in values means "4". */}}
{{- define "moge.stringMap" -}}
{{- $out := dict -}}
{{- range $k, $v := . -}}{{- $_ := set $out $k (toString $v) -}}{{- end -}}
{{- toYaml $out -}}
{{- end -}}
