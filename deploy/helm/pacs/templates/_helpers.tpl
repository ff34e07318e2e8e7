{{/*
Names, labels and the shared pieces of configuration.  Every object name
comes from here; component templates live in _component.tpl.
*/}}

{{- define "pacs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pacs.fullname" -}}
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

{{- define "pacs.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The components: values key -> name (folder, labels, object names), Python
module, settings prefix, whether it touches object storage, and the setting
naming its spool directory (if it has one).
*/}}
{{- define "pacs.components" -}}
dimseGateway: {name: dimse-gateway, module: dimse_gateway, prefix: PACS_GATEWAY_, storage: true, spool: PACS_GATEWAY_SPOOL_DIR}
ingestWorker: {name: ingest-worker, module: ingest_worker, prefix: PACS_WORKER_, storage: true, spool: ""}
queryService: {name: query-service, module: query_service, prefix: PACS_QUERY_, storage: false, spool: ""}
dicomwebApi: {name: dicomweb-api, module: dicomweb_api, prefix: PACS_DICOMWEB_, storage: true, spool: PACS_DICOMWEB_SPOOL_DIR}
hsmMigrator: {name: hsm-migrator, module: hsm_migrator, prefix: PACS_HSM_, storage: true, spool: ""}
prefetchScheduler: {name: prefetch-scheduler, module: prefetch_scheduler, prefix: PACS_PREFETCH_, storage: true, spool: ""}
aiConnector: {name: ai-connector, module: ai_connector, prefix: PACS_AI_, storage: true, spool: PACS_AI_SPOOL_DIR}
{{- end }}

{{/* The metadata of one component: (dict "root" $ "key" "dimseGateway") */}}
{{- define "pacs.component" -}}
{{- index (include "pacs.components" .root | fromYaml) .key | toYaml }}
{{- end }}

{{/* The full name plus a suffix, within 63 characters: (dict "root" $ "suffix" "config") */}}
{{- define "pacs.fullnameWith" -}}
{{- $room := int (sub 62 (len .suffix)) }}
{{- printf "%s-%s" (include "pacs.fullname" .root | trunc $room | trimSuffix "-") .suffix }}
{{- end }}

{{/* Object name of a component: (dict "root" $ "name" "dimse-gateway"); the longest
suffix is the gateway's DICOM Service ("-dicom"), so the room is counted with it. */}}
{{- define "pacs.componentFullname" -}}
{{- printf "%s-%s" (include "pacs.fullname" .root | trunc 43 | trimSuffix "-") .name }}
{{- end }}

{{- define "pacs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pacs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pacs.labels" -}}
helm.sh/chart: {{ include "pacs.chart" . }}
{{ include "pacs.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pacs
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* (dict "root" $ "name" "dimse-gateway") */}}
{{- define "pacs.componentSelectorLabels" -}}
{{ include "pacs.selectorLabels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "pacs.componentLabels" -}}
{{ include "pacs.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "pacs.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "pacs.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pacs.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pacs.configMapName" -}}
{{- include "pacs.fullnameWith" (dict "root" . "suffix" "config") }}
{{- end }}

{{/* Secrets: an existing one when named, else the one the chart creates. */}}
{{- define "pacs.databaseSecretName" -}}
{{- default (include "pacs.fullnameWith" (dict "root" . "suffix" "database")) .Values.database.existingSecret }}
{{- end }}

{{- define "pacs.databaseSecretKey" -}}
{{- if .Values.database.existingSecret }}{{ .Values.database.existingSecretKey }}{{ else }}url{{ end }}
{{- end }}

{{- define "pacs.brokerSecretName" -}}
{{- default (include "pacs.fullnameWith" (dict "root" . "suffix" "broker")) .Values.broker.existingSecret }}
{{- end }}

{{- define "pacs.brokerSecretKey" -}}
{{- if .Values.broker.existingSecret }}{{ .Values.broker.existingSecretKey }}{{ else }}url{{ end }}
{{- end }}

{{/* The Secret holding a tier's credentials: (dict "root" $ "tier" "hot" "backend" $tier.s3) */}}
{{- define "pacs.tierSecretName" -}}
{{- default (include "pacs.fullnameWith" (dict "root" .root "suffix" (printf "storage-%s" (.tier | replace "_" "-")))) .backend.existingSecret }}
{{- end }}

{{/* The claim of a filesystem tier, or nothing (emptyDir). */}}
{{- define "pacs.tierClaimName" -}}
{{- $persistence := .tierValues.filesystem.persistence }}
{{- if $persistence.existingClaim }}
{{- $persistence.existingClaim }}
{{- else if $persistence.create }}
{{- include "pacs.fullnameWith" (dict "root" .root "suffix" (printf "storage-%s" (.tier | replace "_" "-"))) }}
{{- end }}
{{- end }}

{{- define "pacs.queryServiceUrl" -}}
{{- printf "http://%s:%v" (include "pacs.componentFullname" (dict "root" . "name" "query-service")) .Values.queryService.httpPort }}
{{- end }}

{{- define "pacs.dicomwebUrl" -}}
{{- printf "http://%s:%v" (include "pacs.componentFullname" (dict "root" . "name" "dicomweb-api")) .Values.dicomwebApi.httpPort }}
{{- end }}

{{/* The AMQP queue KEDA watches: the ingest queue under the broker namespace. */}}
{{- define "pacs.ingestQueueName" -}}
{{- printf "%singest" .Values.broker.namespace }}
{{- end }}

{{/* Secret environment every component and the migration Job get: the database URL. */}}
{{- define "pacs.databaseEnv" -}}
- name: PACS_DB_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "pacs.databaseSecretName" . }}
      key: {{ include "pacs.databaseSecretKey" . }}
{{- end }}

{{- define "pacs.brokerEnv" -}}
- name: PACS_AMQP_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "pacs.brokerSecretName" . }}
      key: {{ include "pacs.brokerSecretKey" . }}
{{- end }}

{{/* Storage credentials of every tier (non-secret tier settings are in the ConfigMap). */}}
{{- define "pacs.storageSecretEnv" -}}
{{- range $tier, $values := .Values.storage.tiers }}
{{- $prefix := printf "PACS_STORAGE_%s_" (upper $tier) }}
{{- if and (eq $values.backend "s3") (or $values.s3.existingSecret $values.s3.accessKeyId) }}
{{- $secret := include "pacs.tierSecretName" (dict "root" $ "tier" $tier "backend" $values.s3) }}
- name: {{ $prefix }}S3_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ (default "access-key-id" $values.s3.accessKeyIdKey) }}
- name: {{ $prefix }}S3_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ (default "secret-access-key" $values.s3.secretAccessKeyKey) }}
{{- else if eq $values.backend "azure" }}
- name: {{ $prefix }}AZURE_CONNECTION_STRING
  valueFrom:
    secretKeyRef:
      name: {{ include "pacs.tierSecretName" (dict "root" $ "tier" $tier "backend" $values.azure) }}
      key: {{ (default "connection-string" $values.azure.connectionStringKey) }}
{{- end }}
{{- end }}
{{- end }}

{{/* A map of extra settings as env entries: (the map) */}}
{{- define "pacs.envMap" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}
