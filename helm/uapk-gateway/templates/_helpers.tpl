{{/* Names */}}
{{- define "uapk-gateway.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "uapk-gateway.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Refuse values that cannot work, with a clear message. */}}
{{- define "uapk-gateway.validate" -}}
{{- $n := int .Values.replicas -}}
{{- if and (gt $n 1) (eq .Values.state.backend "embedded") -}}
{{- fail (printf "replicas: %d with state.backend: embedded would keep %d budgets, %d approval queues and %d audit logs (one redb file per pod): an agent would get every budget and rate limit %d times over, and no log would hold all the evidence. Set state.backend=postgres (one database for the fleet, see 'Running several replicas' in the README) or run one replica." $n $n $n $n $n) -}}
{{- end -}}
{{- range $path, $ref := dict "state.postgres.urlSecret" .Values.state.postgres.urlSecret "state.postgres.caSecret" .Values.state.postgres.caSecret "rateLimits.redis.urlSecret" .Values.rateLimits.redis.urlSecret "rateLimits.redis.caSecret" .Values.rateLimits.redis.caSecret -}}
{{- if and (or $ref.name $ref.key) (not (and $ref.name $ref.key)) -}}
{{- fail (printf "%s: set both name (the Secret) and key (the key of it to mount), got name %q and key %q" $path ($ref.name | toString) ($ref.key | toString)) -}}
{{- end -}}
{{- end -}}
{{- if eq .Values.state.backend "postgres" -}}
{{- if not .Values.state.postgres.urlSecret.name -}}
{{- fail "state.backend: postgres needs state.postgres.urlSecret {name, key}: the Secret key holding the postgres:// URL, mounted read-only as a file that gateway.yaml's state.postgres.url_file reads (e.g. kubectl create secret generic uapk-postgres --from-literal=url='postgres://uapk:PASSWORD@db:5432/uapk?sslmode=verify-full', then --set state.postgres.urlSecret.name=uapk-postgres,state.postgres.urlSecret.key=url)" -}}
{{- end -}}
{{- if not (include "uapk-gateway.origin" .) -}}
{{- fail "audit.origin is required with state.backend: postgres: every gateway of the fleet appends to the one log named by it, and the pods' host names differ, so there is no default (e.g. --set audit.origin=uapk-gateway/payments-prod)" -}}
{{- end -}}
{{- if not .Values.secrets.gatewayKey -}}
{{- fail "state.backend: postgres needs secrets.gatewayKey: every gateway of a fleet signs the one log with the same key (keys.gateway); without it each pod would generate its own key and refuse to start on the fleet's log. Create one with `uapk-gateway keygen` and store it in a Secret (key gateway.pem)" -}}
{{- end -}}
{{- if .Values.persistence.enabled -}}
{{- fail "persistence.enabled keeps the embedded backend's redb file; with state.backend: postgres the log, budgets and approvals live in the database and no volume is mounted. Set persistence.enabled=false (the chart then no longer renders the PVC and helm deletes it: export the embedded log first if you still need it, see the README's backups section)" -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.rateLimits.backend "redis") (not .Values.rateLimits.redis.urlSecret.name) -}}
{{- fail "rateLimits.backend: redis needs rateLimits.redis.urlSecret {name, key}: the Secret key holding the redis:// or rediss:// URL, mounted read-only as a file that gateway.yaml's rate_limits.redis.url_file reads" -}}
{{- end -}}
{{- if and .Values.persistence.enabled (gt $n 1) -}}
{{- fail "persistence.enabled holds one ReadWriteOnce volume: it cannot serve more than one replica" -}}
{{- end -}}
{{- $ports := list (int .Values.ports.proxy) (int .Values.ports.admin) -}}
{{- if eq .Values.mode "transparent" }}{{ $ports = append $ports (int .Values.ports.transparent) }}{{ end -}}
{{- if ne (len $ports) (len (uniq $ports)) -}}
{{- fail (printf "ports: proxy, transparent and admin must differ (%v)" $ports) -}}
{{- end -}}
{{- range $ports -}}
{{- if and (ge . 15000) (le . 15090) -}}
{{- fail (printf "ports: %d is in 15000-15090, which Istio reserves for its sidecar; pick another port" .) -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.mode "egress-gateway") (not (and .Values.agents.podSelector .Values.agents.podSelector.matchLabels)) -}}
{{- fail "agents.podSelector.matchLabels is required in egress-gateway mode: it selects the agents' pods, whose egress the chart restricts to the gateway (an empty selector would select every pod of the namespace)" -}}
{{- end -}}
{{- range .Values.iptables.exemptUids -}}
{{- if eq (int .) (int $.Values.agent.uid) -}}
{{- fail (printf "agent.uid %d is in iptables.exemptUids: its traffic would bypass the gateway" (int .)) -}}
{{- end -}}
{{- end -}}
{{- if eq (int .Values.gateway.uid) 1337 -}}
{{- fail "gateway.uid: 1337 is Istio's sidecar UID: Istio's rules exempt that UID's traffic, and in a mesh the gateway would share the proxy's identity; pick another UID" -}}
{{- end -}}
{{- if and (eq .Values.mode "transparent") (not .Values.iptables.enabled) (not .Values.cni.enabled) -}}
{{- fail "mode: transparent needs the iptables init container (iptables.enabled: true) or a CNI plugin that installs the redirect rules (cni.enabled: true); otherwise agent traffic bypasses the gateway" -}}
{{- end -}}
{{- if eq (int .Values.agent.uid) (int .Values.gateway.uid) -}}
{{- fail "agent.uid must differ from gateway.uid: traffic of the gateway's UID is never redirected, so an agent running as it would bypass the gateway" -}}
{{- end -}}
{{- if and (not .Values.policies) (not .Values.existingPoliciesConfigMap) -}}
{{- fail "set policies (file name -> manifest) or existingPoliciesConfigMap: the gateway needs at least one manifest" -}}
{{- end -}}
{{- range $file, $manifest := .Values.policies -}}
{{- if not (regexMatch "\\.ya?ml$" $file) -}}
{{- if and (kindIs "map" $manifest) (or (hasKey $manifest "yaml") (hasKey $manifest "yml")) -}}
{{- fail (printf "policies.%s: the file name lost its \\. and became nested keys; quote the argument: --set-file 'policies.%s\\.yaml=FILE'" $file $file) -}}
{{- end -}}
{{- fail (printf "policies.%s: a manifest's file name must end in .yaml or .yml (the gateway reads only those)" $file) -}}
{{- end -}}
{{- if and (kindIs "string" $manifest) (not (trim $manifest)) -}}
{{- fail (printf "policies.%s is empty" $file) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.issuerKeys.configMap .Values.issuerKeys.secret -}}
{{- fail "issuerKeys: set configMap or secret, not both" -}}
{{- end -}}
{{- if and (or .Values.issuerKeys.configMap .Values.issuerKeys.secret) (not .Values.issuerKeys.files) -}}
{{- fail "issuerKeys.files: list the keys to mount as keys/<file> (e.g. {demo-issuer.pub.pem})" -}}
{{- end -}}
{{- if and .Values.issuerKeys.files (not (or .Values.issuerKeys.configMap .Values.issuerKeys.secret)) -}}
{{- fail "issuerKeys.files needs issuerKeys.configMap or issuerKeys.secret to take them from" -}}
{{- end -}}
{{- end -}}

{{/* gateway.yaml */}}
{{- define "uapk-gateway.config" -}}
{{- $proxyHost := ternary "0.0.0.0" "127.0.0.1" (eq .Values.mode "egress-gateway") -}}
{{- $listeners := dict "proxy" (printf "%s:%d" $proxyHost (int .Values.ports.proxy)) "admin" (printf "0.0.0.0:%d" (int .Values.ports.admin)) -}}
{{- if eq .Values.mode "transparent" }}{{ $_ := set $listeners "transparent" (printf "0.0.0.0:%d" (int .Values.ports.transparent)) }}{{ end -}}
{{- $cfg := dict "listeners" $listeners "policies" "/etc/uapk/policies" "data_dir" "/var/lib/uapk" "log_format" .Values.gateway.logFormat -}}
{{- if .Values.secrets.gatewayKey }}{{ $_ := set $cfg "keys" (dict "gateway" "/etc/uapk/keys/gateway.pem") }}{{ end -}}
{{- if .Values.secrets.ca }}{{ $_ := set $cfg "tls" (dict "ca_cert" "/etc/uapk/ca/ca.pem" "ca_key" "/etc/uapk/ca/ca-key.pem") }}{{ end -}}
{{- if .Values.gateway.adminKeys }}{{ $_ := set $cfg "admin" (dict "keys" .Values.gateway.adminKeys) }}{{ end -}}
{{- with .Values.audit.origin }}{{ $_ := set $cfg "audit" (dict "origin" .) }}{{ end -}}
{{- if eq .Values.state.backend "postgres" -}}
{{- $pg := .Values.state.postgres -}}
{{- $pgc := dict "url_file" "/etc/uapk/state/postgres-url" "pool_size" (int $pg.poolSize) "connect_timeout" $pg.connectTimeout "statement_timeout" $pg.statementTimeout -}}
{{- if $pg.caSecret.name }}{{ $_ := set $pgc "ca_file" "/etc/uapk/state/postgres-ca.pem" }}{{ end -}}
{{- $_ := set $cfg "state" (dict "backend" "postgres" "postgres" $pgc) -}}
{{- end -}}
{{- if eq .Values.rateLimits.backend "redis" -}}
{{- $rd := .Values.rateLimits.redis -}}
{{- $rdc := dict "url_file" "/etc/uapk/state/redis-url" "timeout" $rd.timeout -}}
{{- if $rd.caSecret.name }}{{ $_ := set $rdc "ca_file" "/etc/uapk/state/redis-ca.pem" }}{{ end -}}
{{- $_ := set $cfg "rate_limits" (dict "backend" "redis" "redis" $rdc) -}}
{{- end -}}
{{- toYaml (mustMergeOverwrite $cfg (deepCopy .Values.gateway.config)) -}}
{{- end -}}

{{/* The log's name: audit.origin, else gateway.config's audit.origin. */}}
{{- define "uapk-gateway.origin" -}}
{{- .Values.audit.origin | default (dig "audit" "origin" "" (.Values.gateway.config | default dict)) -}}
{{- end -}}

{{/* The Secret keys the state backends read as files under /etc/uapk/state: a list of
     {secret, key, path}. Empty with the embedded backend and local rate limits. */}}
{{- define "uapk-gateway.stateFiles" -}}
{{- $files := list -}}
{{- if eq .Values.state.backend "postgres" -}}
{{- with .Values.state.postgres.urlSecret }}{{ $files = append $files (dict "secret" .name "key" .key "path" "postgres-url") }}{{ end -}}
{{- with .Values.state.postgres.caSecret }}{{ if .name }}{{ $files = append $files (dict "secret" .name "key" .key "path" "postgres-ca.pem") }}{{ end }}{{ end -}}
{{- end -}}
{{- if eq .Values.rateLimits.backend "redis" -}}
{{- with .Values.rateLimits.redis.urlSecret }}{{ $files = append $files (dict "secret" .name "key" .key "path" "redis-url") }}{{ end -}}
{{- with .Values.rateLimits.redis.caSecret }}{{ if .name }}{{ $files = append $files (dict "secret" .name "key" .key "path" "redis-ca.pem") }}{{ end }}{{ end -}}
{{- end -}}
{{- toJson $files -}}
{{- end -}}

{{/* The iptables init container: the only container with NET_ADMIN/NET_RAW. */}}
{{- define "uapk-gateway.initIptables" -}}
- name: uapk-init-iptables
  image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["init-iptables", "--proxy-uid", "{{ .Values.gateway.uid }}", "--port", "{{ .Values.ports.transparent }}"{{ range .Values.iptables.exemptUids }}, "--exempt-uid", "{{ . }}"{{ end }}]
  securityContext:
    runAsUser: 0
    runAsNonRoot: false
    allowPrivilegeEscalation: false
    # iptables takes its lock under /run; this container lives for a second.
    readOnlyRootFilesystem: false
    capabilities:
      drop: ["ALL"]
      add: ["NET_ADMIN", "NET_RAW"]
{{- end -}}

{{/* The gateway container (without restartPolicy). */}}
{{- define "uapk-gateway.gatewayContainer" -}}
- name: uapk-gateway
  image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["run", "-c", "/etc/uapk/config/gateway.yaml"]
{{- if and .Values.sidecar.native (ne .Values.mode "egress-gateway") }}
  restartPolicy: Always
{{- end }}
  ports:
    - { name: proxy, containerPort: {{ .Values.ports.proxy }} }
    - { name: admin, containerPort: {{ .Values.ports.admin }} }
{{- if eq .Values.mode "transparent" }}
    - { name: transparent, containerPort: {{ .Values.ports.transparent }} }
{{- end }}
  startupProbe:
    httpGet: { path: /readyz, port: admin }
    periodSeconds: 1
    failureThreshold: 60
  readinessProbe:
    httpGet: { path: /readyz, port: admin }
    periodSeconds: 5
  livenessProbe:
    httpGet: { path: /livez, port: admin }
    periodSeconds: 10
  resources: {{- toYaml .Values.gateway.resources | nindent 4 }}
  securityContext:
    runAsUser: {{ .Values.gateway.uid }}
    runAsGroup: {{ .Values.gateway.uid }}
    runAsNonRoot: true
    readOnlyRootFilesystem: true
    allowPrivilegeEscalation: false
    capabilities: { drop: ["ALL"] }
    seccompProfile: { type: RuntimeDefault }
  volumeMounts:
    - { name: uapk-config, mountPath: /etc/uapk/config, readOnly: true }
    - { name: uapk-policies, mountPath: /etc/uapk/policies, readOnly: true }
    - { name: uapk-data, mountPath: /var/lib/uapk }
{{- if .Values.secrets.gatewayKey }}
    - { name: uapk-gateway-key, mountPath: /etc/uapk/keys, readOnly: true }
{{- end }}
{{- if .Values.secrets.ca }}
    - { name: uapk-ca, mountPath: /etc/uapk/ca, readOnly: true }
{{- end }}
{{- if .Values.secrets.credentials }}
    - { name: uapk-credentials, mountPath: /var/run/secrets/uapk, readOnly: true }
{{- end }}
{{- if include "uapk-gateway.stateFiles" . | fromJsonArray }}
    - { name: uapk-state, mountPath: /etc/uapk/state, readOnly: true }
{{- end }}
{{- end -}}

{{/* Init containers for your pod: iptables (transparent) and, natively, the gateway sidecar. */}}
{{- define "uapk-gateway.initContainers" -}}
{{- if and (eq .Values.mode "transparent") .Values.iptables.enabled }}
{{ include "uapk-gateway.initIptables" . }}
{{- end }}
{{- if .Values.sidecar.native }}
{{ include "uapk-gateway.gatewayContainer" . }}
{{- end }}
{{- end -}}

{{/* Containers for your pod on clusters without native sidecars. */}}
{{- define "uapk-gateway.containers" -}}
{{- if not .Values.sidecar.native }}
{{ include "uapk-gateway.gatewayContainer" . }}
{{- end }}
{{- end -}}

{{/* Volumes: config and policies (directory mount), data, secrets; the agent's CA volume holds
     only the certificate. */}}
{{- define "uapk-gateway.volumes" -}}
- name: uapk-config
  configMap: { name: {{ include "uapk-gateway.fullname" . }}-config }
- name: uapk-policies
  # One directory: the manifests, issuer keys under keys/ and credentials under secrets/, where
  # the manifests' relative paths find them. Projected (never subPath): updates reach the pod.
  projected:
    defaultMode: 0440
    sources:
      - configMap: { name: {{ .Values.existingPoliciesConfigMap | default (printf "%s-policies" (include "uapk-gateway.fullname" .)) }} }
{{- with .Values.issuerKeys }}
{{- if or .configMap .secret }}
{{- $items := list }}
{{- range .files }}{{ $items = append $items (dict "key" . "path" (printf "keys/%s" .)) }}{{ end }}
{{- if .configMap }}
      - configMap: { name: {{ .configMap }}, items: {{ toJson $items }} }
{{- else }}
      - secret: { name: {{ .secret }}, items: {{ toJson $items }} }
{{- end }}
{{- end }}
{{- end }}
{{- range $secret, $keys := .Values.credentials }}
{{- $items := list }}
{{- range $keys }}{{ $items = append $items (dict "key" . "path" (printf "secrets/%s" .)) }}{{ end }}
      - secret: { name: {{ $secret }}, items: {{ toJson $items }} }
{{- end }}
- name: uapk-data
{{- if and .Values.persistence.enabled (eq .Values.state.backend "embedded") }}
  persistentVolumeClaim: { claimName: {{ .Values.persistence.existingClaim | default (printf "%s-audit" (include "uapk-gateway.fullname" .)) }} }
{{- else }}
  emptyDir: {}
{{- end }}
{{- if .Values.secrets.gatewayKey }}
- name: uapk-gateway-key
  secret: { secretName: {{ .Values.secrets.gatewayKey }}, defaultMode: 0400, items: [{ key: gateway.pem, path: gateway.pem }] }
{{- end }}
{{- if .Values.secrets.ca }}
- name: uapk-ca
  secret: { secretName: {{ .Values.secrets.ca }}, defaultMode: 0400 }
- name: uapk-ca-cert
  secret: { secretName: {{ .Values.secrets.ca }}, defaultMode: 0444, items: [{ key: ca.pem, path: ca.pem }] }
{{- end }}
{{- if .Values.secrets.credentials }}
- name: uapk-credentials
  secret: { secretName: {{ .Values.secrets.credentials }}, defaultMode: 0400 }
{{- end }}
{{- with include "uapk-gateway.stateFiles" . | fromJsonArray }}
- name: uapk-state
  # The PostgreSQL and Redis URLs (passwords included) and CA certificates, for the gateway only.
  projected:
    defaultMode: 0400
    sources:
{{- range . }}
      - secret: { name: {{ .secret }}, items: [{ key: {{ .key | quote }}, path: {{ .path }} }] }
{{- end }}
{{- end }}
{{- end -}}

{{/* For the agent container: trust the CA (certificate only) and, in explicit mode, the proxy. */}}
{{- define "uapk-gateway.agentEnv" -}}
{{- if .Values.secrets.ca }}
- { name: SSL_CERT_FILE, value: /etc/uapk-ca/ca.pem }
- { name: REQUESTS_CA_BUNDLE, value: /etc/uapk-ca/ca.pem }
- { name: CURL_CA_BUNDLE, value: /etc/uapk-ca/ca.pem }
- { name: NODE_EXTRA_CA_CERTS, value: /etc/uapk-ca/ca.pem }
{{- end }}
{{- if ne .Values.mode "transparent" }}
{{- $proxy := include "uapk-gateway.proxyUrl" . }}
- { name: HTTP_PROXY, value: {{ $proxy | quote }} }
- { name: HTTPS_PROXY, value: {{ $proxy | quote }} }
- { name: http_proxy, value: {{ $proxy | quote }} }
- { name: https_proxy, value: {{ $proxy | quote }} }
- { name: NO_PROXY, value: {{ .Values.agent.noProxy | quote }} }
- { name: no_proxy, value: {{ .Values.agent.noProxy | quote }} }
- { name: NODE_USE_ENV_PROXY, value: "1" }
{{- end }}
{{- end -}}

{{- define "uapk-gateway.agentVolumeMounts" -}}
{{- if .Values.secrets.ca }}
- { name: uapk-ca-cert, mountPath: /etc/uapk-ca, readOnly: true }
{{- end }}
{{- end -}}


{{/* The proxy URL agents use: the sidecar on loopback, or the egress gateway's Service. (The
     capability token goes in it as the password, or in a header: see the README.) */}}
{{- define "uapk-gateway.proxyUrl" -}}
{{- if eq .Values.mode "egress-gateway" -}}
http://{{ .Values.service.name }}.{{ .Release.Namespace }}.svc:{{ .Values.ports.proxy }}
{{- else -}}
http://127.0.0.1:{{ .Values.ports.proxy }}
{{- end -}}
{{- end -}}

{{/* Labels that select the gateway's pods (the demo pod in the sidecar modes). */}}
{{- define "uapk-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The agents' namespace (egress-gateway mode). */}}
{{- define "uapk-gateway.agentsNamespace" -}}
{{- .Values.agents.namespace | default .Release.Namespace -}}
{{- end -}}

{{/* Upgrades: the embedded backend's file is held open by the running pod, so with persistence
     the old pod must stop before the new one starts. */}}
{{- define "uapk-gateway.strategy" -}}
{{- if and (eq .Values.state.backend "embedded") .Values.persistence.enabled -}}
type: Recreate
{{- else -}}
type: RollingUpdate
rollingUpdate: { maxUnavailable: 0, maxSurge: 1 }
{{- end -}}
{{- end -}}

{{/* Pod-level settings every pod of the chart shares (pull secrets, service account, scheduling). */}}
{{- define "uapk-gateway.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.serviceAccount.name }}
serviceAccountName: {{ . }}
{{- end }}
automountServiceAccountToken: {{ .Values.serviceAccount.automount }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod metadata: selector labels, podLabels, the config checksum (a changed gateway.yaml rolls
     the pods) and podAnnotations. */}}
{{- define "uapk-gateway.podMetadata" -}}
labels:
  {{- include "uapk-gateway.selectorLabels" . | nindent 2 }}
  {{- with .Values.podLabels }}{{ toYaml . | nindent 2 }}{{ end }}
annotations:
  checksum/config: {{ include "uapk-gateway.config" . | sha256sum }}
  {{- with .Values.podAnnotations }}{{ toYaml . | nindent 2 }}{{ end }}
{{- end -}}

{{/* The (demo) agent container: never a capability, never the policies or the CA key. */}}
{{- define "uapk-gateway.agentContainer" -}}
- name: {{ .Values.agent.name }}
  image: {{ .Values.agent.image }}
  command: {{ toJson .Values.agent.command }}
  securityContext:
    runAsUser: {{ .Values.agent.uid }}
    runAsGroup: {{ .Values.agent.uid }}
    runAsNonRoot: true
    allowPrivilegeEscalation: false
    capabilities: { drop: ["ALL"] }
    seccompProfile: { type: RuntimeDefault }
  {{- $env := include "uapk-gateway.agentEnv" . | trim }}
  {{- if or $env .Values.agent.env }}
  env:
    {{- if $env }}{{ $env | nindent 4 }}{{ end }}
    {{- with .Values.agent.env }}{{ toYaml . | nindent 4 }}{{ end }}
  {{- end }}
  {{- $mounts := include "uapk-gateway.agentVolumeMounts" . | trim }}
  {{- if $mounts }}
  volumeMounts:
    {{- $mounts | nindent 4 }}
  {{- end }}
{{- end -}}
