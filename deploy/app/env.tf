# The app's environment: settings tfserver reads (docs/configuration.md), wired from the
# outputs of deploy/state and deploy/auth (their app_inputs). No provider is involved, so
# tests evaluate this file on its own and start a tfserver with the result. plain_env and
# secret_env go to every component; the run engine's settings differ between them.

locals {
  plain_env = {
    TFSERVER_HOST           = "0.0.0.0"
    TFSERVER_PORT           = "8000"
    TFSERVER_AUTH           = "jwt"
    COGNITO_ISSUER          = var.cognito_issuer
    JWK_URL                 = var.jwks_url
    TFSERVER_TOKEN_URL      = var.token_url
    TFSERVER_CLIENT_IDS     = join(",", var.client_ids)
    TFSERVER_SCOPE_PREFIX   = var.scope_prefix
    TFSERVER_BACKEND        = "s3"
    TF_STATE_BUCKET         = var.state_bucket
    TF_STATE_REGION         = var.state_region
    TF_STATE_KEY_PREFIX     = var.state_key_prefix
    TF_STATE_LOCK_TABLE     = var.state_lock_table
    TF_STATE_USE_LOCKFILE   = "true"
    TFSERVER_MAX_RUNS       = tostring(var.max_runs)
    TFSERVER_RUN_TIMEOUT    = tostring(var.run_timeout_seconds)
    TFSERVER_LOCK_WAIT      = tostring(var.lock_wait_seconds)
    TFSERVER_SHUTDOWN_GRACE = "60"
    # The governance policy baked into the image (Dockerfile: deploy/policy.toml).
    TFSERVER_POLICY = var.policy_file
    # Every connection comes from App Platform's edge, so per-address limits and logged
    # client addresses need the address it forwards, and one address is every client.
    TFSERVER_TRUSTED_PROXIES        = join(",", var.trusted_proxies)
    TFSERVER_MAX_CONNECTIONS_PER_IP = "0"
  }
  secret_env = {
    AWS_ACCESS_KEY_ID     = var.aws_access_key_id
    AWS_SECRET_ACCESS_KEY = var.aws_secret_access_key
    DIGITALOCEAN_TOKEN    = var.modules_digitalocean_token
  }

  # The run engine (docs/deploy.md, step 10). With `local` the service runs terraform
  # itself, as it always did, and gets none of these. With `sqs` the service answers the
  # API and queues runs on deploy/state's FIFO queue (role api, never terraform), and the
  # worker component takes them from there (role worker).
  engine_env = {
    TFSERVER_QUEUE       = "sqs"
    TFSERVER_QUEUE_URL   = var.queue_url
    TFSERVER_RESUME_LOST = tostring(var.resume_lost)
  }
  service_engine_env = var.engine == "sqs" ? merge(local.engine_env, { TFSERVER_ROLE = "api" }) : {}
  worker_engine_env  = merge(local.engine_env, { TFSERVER_ROLE = "worker" })
}
