{{/*
The objects every component has, rendered from its values key:
  {{ include "pacs.deployment" (dict "root" $ "key" "dimseGateway") }}
*/}}

{{/* Whether a component's replica count is left to an autoscaler. */}}
{{- define "pacs.autoscaled" -}}
{{- $values := index .root.Values .key }}
{{- if or (and $values.autoscaling $values.autoscaling.enabled) (and $values.keda $values.keda.enabled) }}true{{ end }}
{{- end }}

{{/* Settings of one component only (its ports, the URLs of its peers). */}}
{{- define "pacs.componentEnv" -}}
{{- $root := .root }}
{{- $values := index $root.Values .key }}
{{- if eq .key "dimseGateway" }}
- name: PACS_GATEWAY_PORT
  value: {{ $values.dicomPort | quote }}
- name: PACS_GATEWAY_QUERY_URL
  value: {{ include "pacs.queryServiceUrl" $root | quote }}
{{- if and $values.tls.requireClientCert (not $values.tls.verifyClientCerts) }}
{{- fail "dimseGateway.tls.requireClientCert needs dimseGateway.tls.verifyClientCerts (the CA to verify against)" }}
{{- end }}
{{- if $values.tls.enabled }}
- name: PACS_GATEWAY_TLS_ENABLED
  value: "true"
- name: PACS_GATEWAY_TLS_PORT
  value: {{ $values.tls.port | quote }}
- name: PACS_GATEWAY_TLS_CERT_FILE
  value: /etc/pacs/tls/tls.crt
- name: PACS_GATEWAY_TLS_KEY_FILE
  value: /etc/pacs/tls/tls.key
{{- if $values.tls.verifyClientCerts }}
- name: PACS_GATEWAY_TLS_CA_FILE
  value: /etc/pacs/tls/ca.crt
- name: PACS_GATEWAY_TLS_REQUIRE_CLIENT_CERT
  value: {{ $values.tls.requireClientCert | quote }}
{{- end }}
{{- end }}
{{- else if eq .key "dicomwebApi" }}
- name: PACS_DICOMWEB_QUERY_URL
  value: {{ include "pacs.queryServiceUrl" $root | quote }}
{{- $publicBaseUrl := $values.publicBaseUrl }}
{{- if and (not $publicBaseUrl) $values.ingress.enabled $values.ingress.hosts }}
{{- $host := (first $values.ingress.hosts).host }}
{{- $publicBaseUrl = printf "%s://%s" (ternary "https" "http" (gt (len $values.ingress.tls) 0)) $host }}
{{- end }}
{{- if $publicBaseUrl }}
- name: PACS_DICOMWEB_PUBLIC_BASE_URL
  value: {{ $publicBaseUrl | quote }}
{{- end }}
{{- else if eq .key "aiConnector" }}
- name: PACS_AI_DICOMWEB_URL
  value: {{ include "pacs.dicomwebUrl" $root | quote }}
{{- with $values.publicUrl }}
- name: PACS_AI_PUBLIC_URL
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pacs.deployment" -}}
{{- $root := .root }}
{{- $values := index $root.Values .key }}
{{- $meta := include "pacs.component" . | fromYaml }}
{{- $name := include "pacs.componentFullname" (dict "root" $root "name" $meta.name) }}
{{- $liveness := merge (deepCopy $values.livenessProbe) (dict "initialDelaySeconds" 10 "periodSeconds" 10 "timeoutSeconds" 5 "failureThreshold" 6) }}
{{- $readiness := merge (deepCopy $values.readinessProbe) (dict "initialDelaySeconds" 5 "periodSeconds" 5 "timeoutSeconds" 5 "failureThreshold" 3) }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  labels:
    {{- include "pacs.componentLabels" (dict "root" $root "name" $meta.name) | nindent 4 }}
spec:
  {{- if not (include "pacs.autoscaled" .) }}
  replicas: {{ $values.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "pacs.componentSelectorLabels" (dict "root" $root "name" $meta.name) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "pacs.componentSelectorLabels" (dict "root" $root "name" $meta.name) | nindent 8 }}
        {{- with (merge (deepCopy $values.podLabels) $root.Values.podLabels) }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        checksum/secrets: {{ include (print $root.Template.BasePath "/secrets.yaml") $root | sha256sum }}
        {{- with (merge (deepCopy $values.podAnnotations) $root.Values.podAnnotations) }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "pacs.serviceAccountName" $root }}
      automountServiceAccountToken: {{ $root.Values.serviceAccount.automountServiceAccountToken }}
      # Service links would inject PACS_<SERVICE>_PORT=tcp://... into the PACS_ namespace of settings.
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
      {{- with (default $root.Values.nodeSelector $values.nodeSelector) }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (default $root.Values.tolerations $values.tolerations) }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (default $root.Values.affinity $values.affinity) }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $meta.name }}
          image: {{ include "pacs.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["python", "-m", {{ $meta.module | quote }}]
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          ports:
            - name: http
              containerPort: {{ $values.httpPort }}
              protocol: TCP
            {{- if eq .key "dimseGateway" }}
            - name: dicom
              containerPort: {{ $values.dicomPort }}
              protocol: TCP
            {{- if $values.tls.enabled }}
            - name: dicom-tls
              containerPort: {{ $values.tls.port }}
              protocol: TCP
            {{- end }}
            {{- end }}
          envFrom:
            - configMapRef:
                name: {{ include "pacs.configMapName" $root }}
          env:
            - name: PYTHONDONTWRITEBYTECODE
              value: "1"
            - name: PACS_TELEMETRY_SERVICE_INSTANCE
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            - name: {{ $meta.prefix }}HTTP_PORT
              value: {{ $values.httpPort | quote }}
            # Finish or hand back the work in hand before Kubernetes kills the pod.
            - name: PACS_SHUTDOWN_GRACE_SECONDS
              value: {{ max 1 (sub (int $values.terminationGracePeriodSeconds) 5) | quote }}
            {{- with $meta.spool }}
            - name: {{ . }}
              value: /var/lib/pacs/spool
            {{- end }}
            {{- include "pacs.databaseEnv" $root | nindent 12 }}
            {{- include "pacs.brokerEnv" $root | nindent 12 }}
            {{- if $meta.storage }}
            {{- with (include "pacs.storageSecretEnv" $root) }}
            {{- . | trim | nindent 12 }}
            {{- end }}
            {{- end }}
            {{- with (include "pacs.componentEnv" .) }}
            {{- . | trim | nindent 12 }}
            {{- end }}
            {{- with (include "pacs.envMap" $values.env) }}
            {{- . | trim | nindent 12 }}
            {{- end }}
          livenessProbe:
            httpGet:
              path: /health/live
              port: http
            {{- toYaml $liveness | nindent 12 }}
          readinessProbe:
            httpGet:
              path: /health/ready
              port: http
            {{- toYaml $readiness | nindent 12 }}
          {{- with $values.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- if $meta.spool }}
            - name: spool
              mountPath: /var/lib/pacs/spool
            {{- end }}
            {{- if $meta.storage }}
            {{- range $tier, $tierValues := $root.Values.storage.tiers }}
            {{- if eq $tierValues.backend "filesystem" }}
            - name: storage-{{ $tier | replace "_" "-" }}
              mountPath: {{ $tierValues.filesystem.path }}
            {{- end }}
            {{- end }}
            {{- end }}
            {{- if and (eq .key "dimseGateway") $values.tls.enabled }}
            - name: tls
              mountPath: /etc/pacs/tls
              readOnly: true
            {{- end }}
      volumes:
        - name: tmp
          emptyDir: {}
        {{- if $meta.spool }}
        - name: spool
          emptyDir: {}
        {{- end }}
        {{- if $meta.storage }}
        {{- range $tier, $tierValues := $root.Values.storage.tiers }}
        {{- if eq $tierValues.backend "filesystem" }}
        - name: storage-{{ $tier | replace "_" "-" }}
          {{- $claim := include "pacs.tierClaimName" (dict "root" $root "tier" $tier "tierValues" $tierValues) }}
          {{- if $claim }}
          persistentVolumeClaim:
            claimName: {{ $claim }}
          {{- else }}
          emptyDir: {}
          {{- end }}
        {{- end }}
        {{- end }}
        {{- end }}
        {{- if and (eq .key "dimseGateway") $values.tls.enabled }}
        - name: tls
          secret:
            secretName: {{ required "dimseGateway.tls.secretName is required when dimseGateway.tls.enabled" $values.tls.secretName }}
        {{- end }}
{{- end }}

{{/* The HTTP Service (health, metrics, the API): (dict "root" $ "key" ...) */}}
{{- define "pacs.service" -}}
{{- $root := .root }}
{{- $values := index $root.Values .key }}
{{- $meta := include "pacs.component" . | fromYaml }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "pacs.componentFullname" (dict "root" $root "name" $meta.name) }}
  labels:
    {{- include "pacs.componentLabels" (dict "root" $root "name" $meta.name) | nindent 4 }}
    pacs-metrics: "true"
spec:
  type: ClusterIP
  selector:
    {{- include "pacs.componentSelectorLabels" (dict "root" $root "name" $meta.name) | nindent 4 }}
  ports:
    - name: http
      port: {{ $values.httpPort }}
      targetPort: http
      protocol: TCP
{{- end }}

{{- define "pacs.podDisruptionBudget" -}}
{{- $root := .root }}
{{- $values := index $root.Values .key }}
{{- $meta := include "pacs.component" . | fromYaml }}
{{- if $values.podDisruptionBudget.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "pacs.componentFullname" (dict "root" $root "name" $meta.name) }}
  labels:
    {{- include "pacs.componentLabels" (dict "root" $root "name" $meta.name) | nindent 4 }}
spec:
  {{- if hasKey $values.podDisruptionBudget "minAvailable" }}
  minAvailable: {{ $values.podDisruptionBudget.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $values.podDisruptionBudget.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "pacs.componentSelectorLabels" (dict "root" $root "name" $meta.name) | nindent 6 }}
{{- end }}
{{- end }}

{{/* CPU (and memory) HPA for the scalable components. */}}
{{- define "pacs.horizontalPodAutoscaler" -}}
{{- $root := .root }}
{{- $values := index $root.Values .key }}
{{- $meta := include "pacs.component" . | fromYaml }}
{{- $name := include "pacs.componentFullname" (dict "root" $root "name" $meta.name) }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $name }}
  labels:
    {{- include "pacs.componentLabels" (dict "root" $root "name" $meta.name) | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicas: {{ $values.autoscaling.minReplicas }}
  maxReplicas: {{ $values.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $values.autoscaling.targetCPUUtilizationPercentage }}
    {{- with $values.autoscaling.targetMemoryUtilizationPercentage }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
{{- end }}

{{/*
Ingress NetworkPolicy of a component: (dict "root" $ "key" ... "httpFrom" peers).
The HTTP port (API, health, metrics) is open to Prometheus plus httpFrom;
with no peer at all, to nobody (kubelet probes are not subject to policies).
The gateway's DICOM ports are open to networkPolicy.dicomFrom, or anyone.
*/}}
{{- define "pacs.networkPolicy" -}}
{{- $root := .root }}
{{- $values := index $root.Values .key }}
{{- $meta := include "pacs.component" . | fromYaml }}
{{- $policy := $root.Values.networkPolicy }}
{{- $httpFrom := concat $policy.prometheusFrom (default (list) .httpFrom) }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "pacs.componentFullname" (dict "root" $root "name" $meta.name) }}
  labels:
    {{- include "pacs.componentLabels" (dict "root" $root "name" $meta.name) | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "pacs.componentSelectorLabels" (dict "root" $root "name" $meta.name) | nindent 6 }}
  policyTypes:
    - Ingress
  {{- if not (or $httpFrom (eq .key "dimseGateway")) }}
  ingress: []
  {{- else }}
  ingress:
    {{- if $httpFrom }}
    - ports:
        - port: http
          protocol: TCP
      from:
        {{- toYaml $httpFrom | nindent 8 }}
    {{- end }}
    {{- if eq .key "dimseGateway" }}
    - ports:
        - port: dicom
          protocol: TCP
        {{- if $values.tls.enabled }}
        - port: dicom-tls
          protocol: TCP
        {{- end }}
      {{- with $policy.dicomFrom }}
      from:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- end }}
  {{- end }}
{{- end }}

{{/* A peer: the pods of one component of this release. */}}
{{- define "pacs.componentPeer" -}}
- podSelector:
    matchLabels:
      {{- include "pacs.componentSelectorLabels" . | nindent 6 }}
{{- end }}
