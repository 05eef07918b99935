{{/*
Namespace of every namespaced object: .Values.namespace, else the release namespace.
*/}}
{{- define "oats.namespace" -}}
{{- .Values.namespace | default .Release.Namespace -}}
{{- end -}}

{{/*
Labels: the object's own labels (a dict), then .Values.commonLabels, then the two labels the
kustomize base puts on every object (part-of, managed-by). Earlier ones win. Call with
(list $ (dict ...)). Never used for selectors.
*/}}
{{- define "oats.labels" -}}
{{- $ctx := index . 0 -}}
{{- $own := index . 1 -}}
{{- $fixed := dict "app.kubernetes.io/part-of" "oats" "app.kubernetes.io/managed-by" $ctx.Release.Service -}}
{{- toYaml (merge (dict) $own ($ctx.Values.commonLabels | default dict) $fixed) -}}
{{- end -}}

{{- define "oats.labels.common" -}}
{{- include "oats.labels" (list . (dict)) -}}
{{- end -}}

{{- define "oats.labels.api" -}}
{{- include "oats.labels" (list . (dict "app" "oats-backend-api" "app.kubernetes.io/name" "oats-backend-api" "app.kubernetes.io/component" "api")) -}}
{{- end -}}

{{- define "oats.labels.agent" -}}
{{- include "oats.labels" (list . (dict "app" "oats-agent" "app.kubernetes.io/name" "oats-agent" "app.kubernetes.io/component" "agent")) -}}
{{- end -}}

{{- define "oats.labels.postgres" -}}
{{- include "oats.labels" (list . (dict "app" "oats-postgres" "app.kubernetes.io/name" "oats-postgres" "app.kubernetes.io/component" "database")) -}}
{{- end -}}

{{- define "oats.labels.llmGateway" -}}
{{- include "oats.labels" (list . (dict "app" "oats-backend-api" "app.kubernetes.io/name" "oats-backend-api" "app.kubernetes.io/component" "llm-gateway")) -}}
{{- end -}}

{{- define "oats.labels.admission" -}}
{{- include "oats.labels" (list . (dict "app.kubernetes.io/name" "oats-agent-job-guardrails" "app.kubernetes.io/component" "admission-policy")) -}}
{{- end -}}

{{- define "oats.labels.monitoring" -}}
{{- $own := merge (dict "app.kubernetes.io/name" "oats-backend-api" "app.kubernetes.io/component" "api") (.Values.monitoring.labels | default dict) -}}
{{- include "oats.labels" (list . $own) -}}
{{- end -}}

{{/*
Image reference repository:tag[@digest]; call with (list $ .Values.image).
*/}}
{{- define "oats.image" -}}
{{- $ctx := index . 0 -}}
{{- $img := index . 1 -}}
{{- $ref := printf "%s:%s" $img.repository ($img.tag | default $ctx.Chart.AppVersion | toString) -}}
{{- if $img.digest -}}
{{- $ref = printf "%s@%s" $ref $img.digest -}}
{{- end -}}
{{- $ref -}}
{{- end -}}

{{/*
Data of the API's ConfigMap, as sorted `KEY: "value"` lines. The derived keys win over
.Values.config.
*/}}
{{- define "oats.configData" -}}
{{- if not (kindIs "map" .Values.policy) -}}
{{- fail "policy is a mapping {enabled, content, mountPath}: give a policy file with --set-file policy.content=FILE" -}}
{{- end -}}
{{- $derived := dict
  "OATS_AGENT_IMAGE" (include "oats.image" (list . .Values.agent.image))
  "OATS_AGENT_LAUNCHER_IMAGE" (include "oats.image" (list . .Values.agent.image))
  "OATS_AGENT_IMAGE_PULL_POLICY" .Values.agent.image.pullPolicy
  "OATS_AGENT_SERVICE_ACCOUNT" .Values.agent.serviceAccountName
-}}
{{- with .Values.agent.command -}}
{{- $_ := set $derived "OATS_AGENT_COMMAND" (join "," .) -}}
{{- end -}}
{{- with .Values.llmSecret -}}
{{- if .name -}}
{{- if not .keys -}}
{{- fail "llmSecret.keys: name at least one key of llmSecret.name to mount" -}}
{{- end -}}
{{- $_ := set $derived "OATS_LLM_SECRET_NAME" .name -}}
{{- $_ := set $derived "OATS_LLM_SECRET_KEYS" (join "," .keys) -}}
{{- end -}}
{{- end -}}
{{- if .Values.kueue.enabled -}}
{{- $_ := set $derived "OATS_QUEUEING" "kueue" -}}
{{- $_ := set $derived "OATS_KUEUE_DEFAULT_QUEUE" .Values.kueue.defaultQueue -}}
{{- end -}}
{{- if .Values.policy.enabled -}}
{{- $_ := set $derived "OATS_POLICY_FILE" (printf "%s/oats-policy.yaml" (trimSuffix "/" .Values.policy.mountPath)) -}}
{{- end -}}
{{- with .Values.auth.tokensSecret -}}
{{- if .name -}}
{{- $_ := set $derived "OATS_AUTH_TOKENS_FILE" (printf "%s/%s" (trimSuffix "/" .mountPath) .key) -}}
{{- end -}}
{{- end -}}
{{- if .Values.llm.enabled -}}
{{- $_ := set $derived "OATS_LLM_PROVIDERS_FILE" (printf "%s/providers.yaml" (trimSuffix "/" .Values.llm.mountPath)) -}}
{{- $_ := set $derived "OATS_LLM_LISTEN" (printf "0.0.0.0:%d" (.Values.llm.port | int)) -}}
{{- $_ := set $derived "OATS_LLM_GATEWAY_URL" (include "oats.llmGatewayUrl" .) -}}
{{- end -}}
{{- with .Values.database.urlSecret -}}
{{- if .name -}}
{{- $_ := set $derived "OATS_DATABASE_URL_FILE" (printf "%s/%s" (trimSuffix "/" .mountPath) .key) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $derived "OATS_STATE_DIR" .Values.stateDir.path -}}
{{- with .Values.otel -}}
{{- if .endpoint -}}
{{- $_ := set $derived "OTEL_EXPORTER_OTLP_ENDPOINT" .endpoint -}}
{{- end -}}
{{- if .protocol -}}
{{- $_ := set $derived "OTEL_EXPORTER_OTLP_PROTOCOL" .protocol -}}
{{- end -}}
{{- if .sampler -}}
{{- $_ := set $derived "OTEL_TRACES_SAMPLER" .sampler -}}
{{- end -}}
{{- if .samplerArg -}}
{{- $_ := set $derived "OTEL_TRACES_SAMPLER_ARG" (toString .samplerArg) -}}
{{- end -}}
{{- end -}}
{{- range $key, $value := merge $derived (.Values.config | default dict) }}
{{ $key }}: {{ $value | toString | quote }}
{{- end -}}
{{- end -}}

{{/*
The URL agents are given as OPENAI_BASE_URL: llm.gatewayUrl, else Service oats-llm-gateway.
*/}}
{{- define "oats.llmGatewayUrl" -}}
{{- .Values.llm.gatewayUrl | default (printf "http://oats-llm-gateway.%s.svc:%d/v1" (include "oats.namespace" .) (.Values.llm.port | int)) -}}
{{- end -}}

{{/*
The providers file (llm.providers) as text: a string as given, a mapping as YAML.
*/}}
{{- define "oats.llmProviders" -}}
{{- $p := .Values.llm.providers -}}
{{- if not $p -}}
{{- fail "llm.enabled needs llm.providers (the providers file, a YAML mapping or --set-file llm.providers=FILE)" -}}
{{- else if kindIs "string" $p -}}
{{- $p -}}
{{- else -}}
{{- toYaml $p -}}
{{- end -}}
{{- end -}}

{{/*
The URL of the database Secret rendered by the chart: the dev PostgreSQL's, or a placeholder.
*/}}
{{- define "oats.databaseUrl" -}}
{{- if .Values.database.devPostgres.enabled -}}
{{- printf "postgres://oats:%s@oats-postgres:5432/oats" .Values.database.devPostgres.password -}}
{{- else -}}
postgres://oats:REPLACE_ME@oats-postgres:5432/oats
{{- end -}}
{{- end -}}

{{/*
Name of the API's ConfigMap: oats-backend-api-config-<hash of its data>, so that a change rolls
the Deployment (kustomize's configMapGenerator does the same with its own hash).
*/}}
{{- define "oats.configName" -}}
{{- printf "oats-backend-api-config-%s" (include "oats.configData" . | sha256sum | trunc 10) -}}
{{- end -}}

{{/*
Fail early on values that would deploy an API whose agent Jobs are all denied.
*/}}
{{- define "oats.validate" -}}
{{- if .Values.admissionPolicy.enabled -}}
{{- $image := include "oats.image" (list . .Values.agent.image) -}}
{{- $ok := false -}}
{{- range .Values.admissionPolicy.allowedImagePrefixes -}}
{{- if and . (hasPrefix . $image) -}}
{{- $ok = true -}}
{{- end -}}
{{- end -}}
{{- if not $ok -}}
{{- fail (printf "agent image %q does not start with any of admissionPolicy.allowedImagePrefixes %v: the admission policy would deny every agent Job" $image .Values.admissionPolicy.allowedImagePrefixes) -}}
{{- end -}}
{{- end -}}
{{- end -}}
