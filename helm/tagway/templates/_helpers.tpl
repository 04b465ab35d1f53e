{{/* vim: set filetype=mustache: */}}

{{/* Chart name, truncated to the 63 characters DNS names allow. */}}
{{- define "tagway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. If the release name already contains the chart name it is not repeated.
*/}}
{{- define "tagway.fullname" -}}
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

{{- define "tagway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels (app.kubernetes.io/*). */}}
{{- define "tagway.labels" -}}
helm.sh/chart: {{ include "tagway.chart" . }}
{{ include "tagway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tagway
{{- end }}

{{/* Selector labels: stable across upgrades, never add anything that changes. */}}
{{- define "tagway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tagway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "tagway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tagway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the Secret the pods read their env from: the user's existingSecret or the chart's own. */}}
{{- define "tagway.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- include "tagway.fullname" . }}
{{- end }}
{{- end }}

{{/*
The DSN from secrets.existingSecret, by key and not optional, so that a Secret without it stops the pod with a
clear reason (CreateContainerConfigError: couldn't find key) instead of starting a gateway without a DSN. Nothing
when the chart makes the Secret (the render fails without a DSN) or when config.storage.dsn is set. Takes the
root context.
*/}}
{{- define "tagway.dsnEnv" -}}
{{- $storage := (.Values.config | default dict).storage | default dict }}
{{- if and .Values.secrets.existingSecret (not $storage.dsn) }}
- name: TAGWAY_STORAGE__DSN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.existingSecret }}
      key: {{ .Values.secrets.existingSecretDsnKey }}
{{- end }}
{{- end }}

{{- define "tagway.configMapName" -}}
{{- printf "%s-config" (include "tagway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tagway.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
A Kubernetes quantity (2Gi, 500Mi, 5G, 1073741824) as a number of bytes, printed as an integer; "" for an empty value.
*/}}
{{- define "tagway.quantityBytes" -}}
{{- $q := .value }}
{{- if or (kindIs "float64" $q) (kindIs "int" $q) (kindIs "int64" $q) }}
{{- printf "%d" (int64 $q) }}
{{- else if $q }}
{{- $s := trim (toString $q) }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$" $s) }}
{{- fail (printf "%s (%q) is not a size tagway's chart can read: use a number of bytes or a quantity like 2Gi, 500Mi, 5G" .name $s) }}
{{- end }}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $s }}
{{- $unit := trimPrefix $num $s }}
{{- $mult := dict "" 1.0 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 }}
{{- printf "%d" (int64 (mulf (float64 $num) (get $mult $unit))) }}
{{- end }}
{{- end }}

{{/*
Gateway processes per pod: `tagway serve --workers N` (in extraArgs) runs N, each with its own spool slot
(<spool_dir>/worker-<i>), its own write-ahead log and its own recording.spool_max_bytes.
*/}}
{{- define "tagway.workers" -}}
{{- $n := 1 }}
{{- $args := .Values.extraArgs | default list }}
{{- range $i, $a := $args }}
{{- $a = toString $a }}
{{- if hasPrefix "--workers=" $a }}
{{- $n = int (trimPrefix "--workers=" $a) }}
{{- else if and (eq $a "--workers") (lt (add1 $i) (len $args)) }}
{{- $n = int (index $args (add1 $i)) }}
{{- end }}
{{- end }}
{{- max $n 1 }}
{{- end }}

{{/*
The spool cap the gateway gets: recording.spool_max_bytes for each gateway process, as an integer string; "" when
neither the user set it nor a bounded spool volume lets the chart derive it (then the gateway's own default, 5 GiB).

The spool volume (spool.persistence.size with a PVC, else spool.emptyDir.sizeLimit) holds, per process, the spool
files (at most spool_max_bytes), the write-ahead log (storage.spool_dir/worker-<i>/wal: the encoded spans not yet
in ClickHouse or the spool, at most the in-memory backlog, recording.queue_max_bytes, plus the batches in flight
and two 8 MiB segments) and quarantined *.poison / *.corrupt files, which the cap does not count. So the derived cap
is 80 % of the volume, shared among the processes, less each one's write-ahead log. Past the cap the gateway drops
spans (counted, tagway_spans_dropped_total) instead of the kubelet evicting the pod (emptyDir: spool and
write-ahead log deleted, nothing counted) or the disk filling (PVC).
*/}}
{{- define "tagway.spoolMaxBytes" -}}
{{- $recording := (.Values.config | default dict).recording | default dict }}
{{- $persistent := .Values.spool.persistence.enabled }}
{{- $source := ternary "spool.persistence.size" "spool.emptyDir.sizeLimit" $persistent }}
{{- $size := ternary .Values.spool.persistence.size .Values.spool.emptyDir.sizeLimit $persistent }}
{{- $volume := include "tagway.quantityBytes" (dict "value" $size "name" $source) }}
{{- $workers := int (include "tagway.workers" .) }}
{{- $shared := ternary "" (printf ", shared by %d --workers" $workers) (eq $workers 1) }}
{{- /* room for one process's write-ahead log (none with recording.write_ahead: false) */}}
{{- $batch := float64 ($recording.batch_max_bytes | default 33554432) }}
{{- $queue := maxf (float64 ($recording.queue_max_bytes | default 268435456)) $batch }}
{{- $wal := 0.0 }}
{{- if or (kindIs "invalid" $recording.write_ahead) $recording.write_ahead }}
{{- $wal = addf $queue (mulf 2 $batch) 16777216 }}
{{- end }}
{{- if not (kindIs "invalid" $recording.spool_max_bytes) }}
{{- $cap := int64 $recording.spool_max_bytes }}
{{- if and $volume (or (eq $cap 0) (gt (mulf (addf $cap $wal) $workers) (float64 $volume))) }}
{{- fail (printf "config.recording.spool_max_bytes (%d%s) does not fit the spool volume (%s %v = %s bytes%s) beside the write-ahead log (%d bytes per process): the spool would outgrow the volume before the cap applies (emptyDir: the kubelet evicts the pod and deletes the spool; PVC: the disk fills). Leave it unset (the chart derives it from the volume) or make the volume larger" $cap (ternary ": no cap" "" (eq $cap 0)) $source $size $volume $shared (int64 $wal)) }}
{{- end }}
{{- printf "%d" $cap }}
{{- else if $volume }}
{{- $cap := subf (divf (mulf (float64 $volume) 0.8) $workers) $wal }}
{{- if lt $cap $batch }}
{{- fail (printf "the spool volume (%s %v%s) is too small: 80%% of it, less room for the write-ahead log (recording.queue_max_bytes + 2 x recording.batch_max_bytes + 16 MiB = %d bytes per process), leaves %d bytes of spool per process, less than one batch (recording.batch_max_bytes, %d); make the volume larger or lower recording.queue_max_bytes" $source $size $shared (int64 $wal) (int64 $cap) (int64 $batch)) }}
{{- end }}
{{- printf "%d" (int64 $cap) }}
{{- end }}
{{- end }}

{{/*
The rendered tagway.yaml (one definition, used by the ConfigMap and by the checksum annotation): .Values.config
verbatim, plus recording.spool_max_bytes derived from the spool volume when the user did not set it.
*/}}
{{- define "tagway.configYaml" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $recording := $config.recording | default dict }}
{{- if kindIs "invalid" $recording.spool_max_bytes }}
{{- $cap := include "tagway.spoolMaxBytes" . }}
{{- if $cap }}
{{- $_ := set $recording "spool_max_bytes" (int64 $cap) }}
{{- $_ := set $config "recording" $recording }}
{{- end }}
{{- else }}
{{- $_ := include "tagway.spoolMaxBytes" . }}
{{- end }}
{{- /* The gateway's grace for calls in flight at SIGTERM (server.graceful_shutdown_seconds, 60 s by default) must
end before the pod's grace does, less the preStop sleep and a few seconds for the last flush: else the kubelet's
SIGKILL cuts calls and the flush short. Unset: lowered to fit when 60 s does not; set: refused when it does not. */}}
{{- $server := $config.server | default dict }}
{{- $room := sub (sub (int .Values.terminationGracePeriodSeconds) (int .Values.preStopSleepSeconds)) 5 }}
{{- if kindIs "invalid" $server.graceful_shutdown_seconds }}
{{- if lt $room 60 }}
{{- $_ := set $server "graceful_shutdown_seconds" (max 1 $room) }}
{{- $_ := set $config "server" $server }}
{{- end }}
{{- else if gt (float64 $server.graceful_shutdown_seconds) (float64 $room) }}
{{- fail (printf "config.server.graceful_shutdown_seconds (%v) does not fit terminationGracePeriodSeconds (%v) less preStopSleepSeconds (%v) and 5 s for the last flush: the kubelet would kill the gateway before its calls finish and its spans are flushed; raise terminationGracePeriodSeconds or lower it" $server.graceful_shutdown_seconds .Values.terminationGracePeriodSeconds .Values.preStopSleepSeconds) }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
A ClickHouse DSN the pods can share: a server over HTTP(S). chDB (`chdb:`, in any case) is one process per data
directory; the gateway refuses any other scheme at start-up.
*/}}
{{- define "tagway.checkDsn" -}}
{{- $dsn := lower .dsn }}
{{- if hasPrefix "chdb" $dsn }}
{{- fail (printf "%s is an embedded chDB DSN: chDB is single-process and cannot be shared by pods; point the chart at a ClickHouse server (http(s)://user:pass@host:8123/db)" .name) }}
{{- end }}
{{- if and $dsn (not (regexMatch "^https?://" $dsn)) }}
{{- fail (printf "%s must be a ClickHouse server DSN, http(s)://user:password@host:8123/database (the gateway refuses any other scheme)" .name) }}
{{- end }}
{{- end }}

{{/*
Render-time checks. Called from the workload template so that a bad combination fails `helm install` with a
clear message instead of a pod that never starts.
*/}}
{{- define "tagway.validate" -}}
{{- if not (has .Values.kind (list "Deployment" "StatefulSet")) }}
{{- fail (printf "kind must be Deployment or StatefulSet, got %q" .Values.kind) }}
{{- end }}
{{- if and .Values.spool.persistence.enabled (ne .Values.kind "StatefulSet") }}
{{- fail "spool.persistence.enabled needs kind: StatefulSet (a Deployment cannot give each pod its own PVC; a shared volume would let two pods re-send the same spool files)" }}
{{- end }}
{{- $storage := (.Values.config | default dict).storage | default dict }}
{{- $configDsn := trim (toString ($storage.dsn | default "")) }}
{{- $secretDsn := trim (toString (.Values.secrets.clickhouseDsn | default "")) }}
{{- include "tagway.checkDsn" (dict "name" "config.storage.dsn" "dsn" $configDsn) }}
{{- if not .Values.secrets.existingSecret }}
{{- include "tagway.checkDsn" (dict "name" "secrets.clickhouseDsn" "dsn" $secretDsn) }}
{{- if and (not $secretDsn) (not $configDsn) }}
{{- fail "secrets.clickhouseDsn is empty: the gateway would fall back to its embedded store under a read-only directory and crash-loop; set secrets.clickhouseDsn to your ClickHouse server (http(s)://user:password@host:8123/database), or set secrets.existingSecret to a Secret holding it under the key TAGWAY_STORAGE__DSN" }}
{{- end }}
{{- end }}
{{- if not (regexMatch "^[A-Za-z_][A-Za-z0-9_.-]*$" (toString .Values.secrets.existingSecretDsnKey)) }}
{{- fail (printf "secrets.existingSecretDsnKey (%q) must be the key of secrets.existingSecret that holds the ClickHouse DSN, e.g. TAGWAY_STORAGE__DSN" (toString .Values.secrets.existingSecretDsnKey)) }}
{{- end }}
{{- if not (regexMatch "^[0-9]+$" (toString .Values.containerPort)) }}
{{- fail (printf "containerPort must be a port number (1-65535), got %q" (toString .Values.containerPort)) }}
{{- end }}
{{- if or (lt (int .Values.containerPort) 1) (gt (int .Values.containerPort) 65535) }}
{{- fail (printf "containerPort must be a port number (1-65535), got %v" .Values.containerPort) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.minReplicas (%v) is greater than autoscaling.maxReplicas (%v): the API server refuses such a HorizontalPodAutoscaler" .Values.autoscaling.minReplicas .Values.autoscaling.maxReplicas) }}
{{- end }}
{{- if and (gt (int .Values.preStopSleepSeconds) 0) (ge (int .Values.preStopSleepSeconds) (int .Values.terminationGracePeriodSeconds)) }}
{{- fail (printf "preStopSleepSeconds (%v) must be less than terminationGracePeriodSeconds (%v): the preStop sleep counts against the grace period, so the gateway would be killed before (or right after) it gets SIGTERM, with no time to finish calls and flush its spool" .Values.preStopSleepSeconds .Values.terminationGracePeriodSeconds) }}
{{- end }}
{{- if not $storage.spool_dir }}
{{- fail (printf "config.storage.spool_dir is not set: set it to spool.mountPath (%s), the only writable place for the spool (the root filesystem is read-only)" .Values.spool.mountPath) }}
{{- end }}
{{- if ne (toString $storage.spool_dir) .Values.spool.mountPath }}
{{- fail (printf "config.storage.spool_dir (%s) must equal spool.mountPath (%s): the spool must live on the writable spool volume" $storage.spool_dir .Values.spool.mountPath) }}
{{- end }}
{{- $metrics := (.Values.config | default dict).metrics | default dict }}
{{- if and .Values.serviceMonitor.enabled $metrics.auth (not .Values.serviceMonitor.authorization) }}
{{- fail "serviceMonitor.enabled with config.metrics.auth: /metrics needs the admin key, so Prometheus would get 401 on every scrape; set serviceMonitor.authorization (e.g. {type: Bearer, credentials: {name: <secret>, key: TAGWAY_ADMIN_KEY}})" }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) }}
{{- fail "podDisruptionBudget: set only one of maxUnavailable and minAvailable (set the other to null)" }}
{{- end }}
{{- end }}
