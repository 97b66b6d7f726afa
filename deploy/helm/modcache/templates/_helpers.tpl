{{/* Names, labels, image and the hardened pod pieces shared by every template. */}}

{{- define "modcache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modcache.fullname" -}}
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

{{/* A name for one component's objects, e.g. "<fullname>-operator" (kept within 63 characters). */}}
{{- define "modcache.componentName" -}}
{{- printf "%s-%s" (include "modcache.fullname" .root | trunc (int (sub 62 (len .component)))) .component | trimSuffix "-" }}
{{- end }}

{{- define "modcache.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modcache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modcache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "modcache.labels" -}}
helm.sh/chart: {{ include "modcache.chart" . }}
{{ include "modcache.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: modcache
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component: {{ include "modcache.componentLabels" (dict "root" $ "component" "operator") }} */}}
{{- define "modcache.componentLabels" -}}
{{ include "modcache.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "modcache.componentSelectorLabels" -}}
{{ include "modcache.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "modcache.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "modcache.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "modcache.componentName" (dict "root" . "component" "operator")) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "modcache.consumerServiceAccountName" -}}
{{- if .Values.consumer.serviceAccount.create }}
{{- default (include "modcache.componentName" (dict "root" . "component" "consumer")) .Values.consumer.serviceAccount.name }}
{{- else }}
{{- required "consumer.serviceAccount.name is required when consumer.serviceAccount.create is false" .Values.consumer.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespace a namespaced operator watches (and where its Role lives). */}}
{{- define "modcache.watchNamespace" -}}
{{- default .Release.Namespace .Values.operator.watchNamespace }}
{{- end }}

{{- define "modcache.leaseName" -}}
{{- default (include "modcache.componentName" (dict "root" . "component" "operator")) .Values.operator.leaderElection.leaseName }}
{{- end }}

{{- define "modcache.instanceName" -}}
{{- default (include "modcache.fullname" .) .Values.instance.name }}
{{- end }}

{{/* The secrets a container reads from files (MODCACHE_<NAME>_FILE; never secretKeyRef env, CKV_K8S_35):
     a list of (dict "env" "MODCACHE_REDIS_URL" "ref" .Values.secretRefs.redisUrl "file" "redis-url"). */}}
{{- define "modcache.secretFileEnv" -}}
{{- range .secrets }}
- name: {{ .env }}_FILE
  value: {{ printf "%s/%s" $.mountPath .file | quote }}
{{- end }}
{{- end }}

{{/* One read-only projected volume holding those secrets as files (mode 0440: the container's group). */}}
{{- define "modcache.secretFilesVolume" -}}
- name: secrets
  projected:
    defaultMode: 288  # 0440
    sources:
      {{- range .secrets }}
      - secret:
          name: {{ required (printf "a Secret name is required for %s" .env) .ref.name }}
          items:
            - key: {{ .ref.key }}
              path: {{ .file }}
      {{- end }}
{{- end }}

{{- define "modcache.secretFilesVolumeMount" -}}
- name: secrets
  mountPath: {{ .mountPath }}
  readOnly: true
{{- end }}

{{/* The executor's image: its own repository/tag/digest when set, else the chart's image. */}}
{{- define "modcache.executorImage" -}}
{{- $e := .Values.consumer.executor.image }}
{{- if not $e.repository }}
{{- include "modcache.image" . }}
{{- else if $e.digest }}
{{- printf "%s@%s" $e.repository $e.digest }}
{{- else }}
{{- printf "%s:%s" $e.repository (default (default .Chart.AppVersion .Values.image.tag) $e.tag) }}
{{- end }}
{{- end }}

{{/* Restricted Pod Security Standard: non-root fixed identity, RuntimeDefault seccomp. */}}
{{- define "modcache.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "modcache.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The executor's: the same restrictions under a uid of its own. */}}
{{- define "modcache.executorSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: {{ .Values.consumer.executor.runAsUser }}
runAsGroup: {{ .Values.consumer.executor.runAsGroup }}
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The only writable place: /tmp (HOME points there in the image). */}}
{{- define "modcache.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}

{{- define "modcache.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* Scheduling knobs of one component's values (.nodeSelector, .tolerations, ...). */}}
{{- define "modcache.scheduling" -}}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* "true" when the uninstall hook renders: it needs the chart's ModuleCache and may create its own RBAC. */}}
{{- define "modcache.uninstallHook" -}}
{{- if and .Values.instance.enabled .Values.instance.uninstallHook.enabled .Values.rbac.create }}true{{ end }}
{{- end }}

{{/* Refuse combinations that would install something broken. */}}
{{- define "modcache.validate" -}}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.leaderElection.enabled) }}
{{- fail "operator.replicas > 1 requires operator.leaderElection.enabled=true (kopf alone would run two writers)" }}
{{- end }}
{{- if eq (int .Values.consumer.executor.runAsUser) (int .Values.podSecurity.runAsUser) }}
{{- fail "consumer.executor.runAsUser must differ from podSecurity.runAsUser: workflow code must not run as the uid holding the credentials" }}
{{- end }}
{{- if and .Values.instance.enabled (not .Values.rbac.clusterWide) (ne (include "modcache.watchNamespace" .) .Release.Namespace) }}
{{- fail "instance.enabled creates the ModuleCache in the release namespace, which a namespaced operator watching operator.watchNamespace would not see: set rbac.clusterWide=true, or instance.enabled=false" }}
{{- end }}
{{- if and (eq .Values.redis.topology "cluster") (not (regexMatch "^[^{]*[{][^}]+[}]" .Values.keyPrefix)) }}
{{- fail (printf "redis.topology=cluster needs a hash tag in keyPrefix so every key of the cache is in one slot (the write scripts are atomic only within a slot): for example keyPrefix={bifrost}:module: instead of %s" .Values.keyPrefix) }}
{{- end }}
{{- range $service := list "redis" "postgres" }}
{{- $ca := (index $.Values $service).tls.caBundle }}
{{- if and $ca.secret $ca.configMap }}
{{- fail (printf "%s.tls.caBundle names both a Secret and a ConfigMap: give one" $service) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Production topologies (docs/topologies.md): the TLS files of .Values.redis.tls / .Values.postgres.tls, each
     mounted read-only from the Secret or ConfigMap it names, and the MODCACHE_* settings pointing at them. */}}
{{- define "modcache.tlsFiles" -}}
{{- $files := list }}
{{- range $service := list "redis" "postgres" }}
{{- $tls := (index $.Values $service).tls }}
{{- $setting := ternary "REDIS_SSL" "DATABASE_SSL" (eq $service "redis") }}
{{- $ca := $tls.caBundle }}
{{- if or $ca.secret $ca.configMap }}
{{- $caSetting := ternary "CA_FILE" "ROOT_CERT_FILE" (eq $service "redis") }}
{{- $files = append $files (dict "volume" (printf "%s-ca" $service) "dir" (printf "/etc/modcache/tls/%s/ca" $service) "secret" $ca.secret "configMap" $ca.configMap "items" (list (dict "key" $ca.key "path" "ca.crt" "env" (printf "MODCACHE_%s_%s" $setting $caSetting)))) }}
{{- end }}
{{- $client := $tls.clientCertificate }}
{{- if $client.secret }}
{{- $files = append $files (dict "volume" (printf "%s-client" $service) "dir" (printf "/etc/modcache/tls/%s/client" $service) "secret" $client.secret "configMap" "" "items" (list (dict "key" $client.certKey "path" "tls.crt" "env" (printf "MODCACHE_%s_CERT_FILE" $setting)) (dict "key" $client.keyKey "path" "tls.key" "env" (printf "MODCACHE_%s_KEY_FILE" $setting)))) }}
{{- end }}
{{- end }}
{{- toJson (dict "files" $files) }}
{{- end }}

{{/* Env entries for the topology settings (TLS files, cert checks); the Sentinel password is a secret file. */}}
{{- define "modcache.topologyEnv" -}}
{{- range (include "modcache.tlsFiles" . | fromJson).files }}
{{- $dir := .dir }}
{{- range .items }}
- name: {{ .env }}
  value: {{ printf "%s/%s" $dir .path | quote }}
{{- end }}
{{- end }}
{{- if or .Values.redis.tls.caBundle.secret .Values.redis.tls.caBundle.configMap .Values.redis.tls.clientCertificate.secret (ne .Values.redis.tls.certReqs "required") }}
- name: MODCACHE_REDIS_SSL_CERT_REQS
  value: {{ .Values.redis.tls.certReqs | quote }}
- name: MODCACHE_REDIS_SSL_CHECK_HOSTNAME
  value: {{ .Values.redis.tls.checkHostname | quote }}
{{- end }}
{{- with .Values.postgres.tls.mode }}
- name: MODCACHE_DATABASE_SSL_MODE
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{- define "modcache.topologyVolumeMounts" -}}
{{- range (include "modcache.tlsFiles" . | fromJson).files }}
- name: {{ .volume }}
  mountPath: {{ .dir }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "modcache.topologyVolumes" -}}
{{- range (include "modcache.tlsFiles" . | fromJson).files }}
- name: {{ .volume }}
  {{- if .secret }}
  secret:
    secretName: {{ .secret }}
    defaultMode: 0440
  {{- else }}
  configMap:
    name: {{ .configMap }}
    defaultMode: 0440
  {{- end }}
    items:
      {{- range .items }}
      - key: {{ .key }}
        path: {{ .path }}
      {{- end }}
{{- end }}
{{- end }}

{{/* checkov (tests/deploy/test_checkov.py): the checks every workload of the chart skips on purpose, with the
     reason, as annotations on the workload itself (skip1-3; each template adds its own from skip4 on). */}}
{{- define "modcache.checkovImageSkips" -}}
checkov.io/skip1: "CKV_K8S_11=no CPU limit on purpose: CFS throttling stalls the asyncio loop (probes, Lease renewals, LISTEN keepalives) in bursts; CPU is requested, memory is limited"
{{- if not .Values.image.digest }}
checkov.io/skip2: "CKV_K8S_43=image.digest is unset in these values: the tag defaults to the chart's appVersion; set image.digest to pin the image"
{{- end }}
{{- if ne .Values.image.pullPolicy "Always" }}
checkov.io/skip3: "CKV_K8S_15=image.pullPolicy IfNotPresent: the image is pinned by tag or digest, and Always would make every restart depend on the registry"
{{- end }}
{{- end }}
