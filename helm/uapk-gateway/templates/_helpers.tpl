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
{{- $listeners := dict "proxy" "127.0.0.1:15080" "admin" "0.0.0.0:15021" -}}
{{- if eq .Values.mode "transparent" }}{{ $_ := set $listeners "transparent" "0.0.0.0:15001" }}{{ end -}}
{{- $cfg := dict "listeners" $listeners "policies" "/etc/uapk/policies" "data_dir" "/var/lib/uapk" "log_format" .Values.gateway.logFormat -}}
{{- if .Values.secrets.gatewayKey }}{{ $_ := set $cfg "keys" (dict "gateway" "/etc/uapk/keys/gateway.pem") }}{{ end -}}
{{- if .Values.secrets.ca }}{{ $_ := set $cfg "tls" (dict "ca_cert" "/etc/uapk/ca/ca.pem" "ca_key" "/etc/uapk/ca/ca-key.pem") }}{{ end -}}
{{- if .Values.gateway.adminKeys }}{{ $_ := set $cfg "admin" (dict "keys" .Values.gateway.adminKeys) }}{{ end -}}
{{- toYaml (mustMergeOverwrite $cfg (deepCopy .Values.gateway.config)) -}}
{{- end -}}

{{/* The iptables init container: the only container with NET_ADMIN/NET_RAW. */}}
{{- define "uapk-gateway.initIptables" -}}
- name: uapk-init-iptables
  image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["init-iptables", "--proxy-uid", "{{ .Values.gateway.uid }}", "--port", "15001"]
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
{{- if .Values.sidecar.native }}
  restartPolicy: Always
{{- end }}
  ports:
    - { name: proxy, containerPort: 15080 }
    - { name: admin, containerPort: 15021 }
{{- if eq .Values.mode "transparent" }}
    - { name: transparent, containerPort: 15001 }
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
{{- if .Values.persistence.enabled }}
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
{{- end -}}

{{/* For the agent container: trust the CA (certificate only) and, in explicit mode, the proxy. */}}
{{- define "uapk-gateway.agentEnv" -}}
{{- if .Values.secrets.ca }}
- { name: SSL_CERT_FILE, value: /etc/uapk-ca/ca.pem }
- { name: REQUESTS_CA_BUNDLE, value: /etc/uapk-ca/ca.pem }
- { name: CURL_CA_BUNDLE, value: /etc/uapk-ca/ca.pem }
- { name: NODE_EXTRA_CA_CERTS, value: /etc/uapk-ca/ca.pem }
{{- end }}
{{- if eq .Values.mode "explicit" }}
- { name: HTTP_PROXY, value: "http://127.0.0.1:15080" }
- { name: HTTPS_PROXY, value: "http://127.0.0.1:15080" }
- { name: http_proxy, value: "http://127.0.0.1:15080" }
- { name: https_proxy, value: "http://127.0.0.1:15080" }
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
