variable "app_name" {
  type        = string
  default     = "tfserver"
  description = "Name of the App Platform app."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}[a-z0-9]$", var.app_name))
    error_message = "App names are 3-32 lowercase letters, digits and dashes."
  }
}

variable "region" {
  type        = string
  default     = "nyc"
  description = "App Platform region slug, such as nyc, ams, fra, sfo, sgp, lon, tor, blr, syd."

  validation {
    condition     = can(regex("^[a-z]{3}$", var.region))
    error_message = "The region is a three-letter App Platform slug such as nyc."
  }
}

variable "domain" {
  type        = string
  description = "Custom domain; App Platform issues and renews its Let's Encrypt certificate."

  validation {
    condition     = can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]{2,}$", var.domain))
    error_message = "The domain must be a lowercase host name such as tfserver.example.com."
  }
}

variable "dns_zone" {
  type        = string
  default     = null
  description = "DigitalOcean DNS zone of the domain, if DigitalOcean hosts it (records are then made for you)."
}

variable "instance_count" {
  type        = number
  default     = 2
  description = "Instances of the service; at least two, sharing state and locks in S3 (with engine sqs: API replicas, which run no terraform)."

  validation {
    condition     = var.instance_count >= 2 && floor(var.instance_count) == var.instance_count
    error_message = "Run at least two instances."
  }
}

variable "instance_size_slug" {
  type        = string
  default     = "apps-s-1vcpu-1gb"
  description = "App Platform instance size of the service (with engine sqs it answers the API only)."
}

variable "engine" {
  type        = string
  default     = "local"
  description = "Run engine: local (the service runs terraform itself, as before) or sqs (the service queues runs on deploy/state's queue and the worker component runs them)."

  validation {
    condition     = contains(["local", "sqs"], var.engine)
    error_message = "The engine is local or sqs."
  }
}

variable "queue_url" {
  type        = string
  default     = ""
  description = "Output queue_url of deploy/state (TFSERVER_QUEUE_URL); used with engine sqs."

  validation {
    condition     = var.engine != "sqs" || can(regex("^https?://[^/]+/[0-9]+/[A-Za-z0-9_-]+\\.fifo$", var.queue_url))
    error_message = "With engine sqs, give deploy/state's queue_url (a FIFO queue's URL)."
  }
}

variable "worker_count" {
  type        = number
  default     = 2
  description = "Worker instances with engine sqs; each runs up to max_runs terraform runs at once."

  validation {
    condition     = var.worker_count >= 1 && floor(var.worker_count) == var.worker_count
    error_message = "Run at least one worker."
  }
}

variable "worker_size_slug" {
  type        = string
  default     = "apps-s-1vcpu-2gb"
  description = "App Platform instance size of a worker: terraform and its providers run there (an AWS or DigitalOcean provider takes a few hundred MB per run)."
}

variable "worker_grace_seconds" {
  type        = number
  default     = 120
  description = "How long App Platform waits after a worker's SIGTERM before killing it: longer than TFSERVER_SHUTDOWN_GRACE (60 s), so a stopping worker finishes or hands back its runs."

  validation {
    condition     = var.worker_grace_seconds > 60 && var.worker_grace_seconds <= 600
    error_message = "More than TFSERVER_SHUTDOWN_GRACE (60 s), at most App Platform's 600 s."
  }
}

variable "resume_lost" {
  type        = number
  default     = 1
  description = "Times a run whose worker died is run again (TFSERVER_RESUME_LOST); keep it below deploy/state's max_receive_count minus one."

  validation {
    condition     = var.resume_lost >= 0 && floor(var.resume_lost) == var.resume_lost
    error_message = "Zero or more whole times."
  }
}

variable "image_registry_type" {
  type        = string
  default     = "DOCR"
  description = "Where the image lives: DOCR, DOCKER_HUB or GHCR."

  validation {
    condition     = contains(["DOCR", "DOCKER_HUB", "GHCR"], var.image_registry_type)
    error_message = "The registry type is DOCR, DOCKER_HUB or GHCR."
  }
}

variable "image_registry" {
  type        = string
  default     = null
  description = "Registry namespace (Docker Hub or GHCR user); unused for DOCR."
}

variable "image_repository" {
  type        = string
  default     = "tfserver"
  description = "Image repository."
}

variable "image_tag" {
  type        = string
  description = "Image tag to run (a version, not latest)."

  validation {
    condition     = var.image_tag != "latest" && can(regex("^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", var.image_tag))
    error_message = "Name a real tag, not latest."
  }
}

variable "cognito_issuer" {
  type        = string
  description = "Output issuer of deploy/auth (COGNITO_ISSUER)."

  validation {
    condition     = can(regex("^https://cognito-idp\\.[a-z0-9-]+\\.amazonaws\\.com/[A-Za-z0-9_-]+$", var.cognito_issuer))
    error_message = "The issuer is https://cognito-idp.<region>.amazonaws.com/<pool id>."
  }
}

variable "jwks_url" {
  type        = string
  description = "Output jwks_url of deploy/auth (JWK_URL)."
}

variable "token_url" {
  type        = string
  default     = ""
  description = "Output token_url of deploy/auth (TFSERVER_TOKEN_URL): named in the OpenAPI document and allowed by the docs page's Content-Security-Policy."
}

variable "client_ids" {
  type        = list(string)
  description = "Clients allowed to call tfserver (TFSERVER_CLIENT_IDS): output client_ids of deploy/auth."

  validation {
    condition     = length(var.client_ids) > 0
    error_message = "Allow at least one client."
  }
}

variable "scope_prefix" {
  type        = string
  default     = "tfserver"
  description = "Scope prefix (TFSERVER_SCOPE_PREFIX), as in deploy/auth."
}

variable "state_bucket" {
  type        = string
  description = "Output bucket of deploy/state (TF_STATE_BUCKET)."
}

variable "state_region" {
  type        = string
  description = "Output region of deploy/state (TF_STATE_REGION)."
}

variable "state_lock_table" {
  type        = string
  description = "Output lock_table of deploy/state (TF_STATE_LOCK_TABLE)."
}

variable "state_key_prefix" {
  type        = string
  default     = "tfserver"
  description = "Output key_prefix of deploy/state (TF_STATE_KEY_PREFIX)."
}

variable "aws_access_key_id" {
  type        = string
  sensitive   = true
  description = "Output access_key_id of deploy/state: the runtime user's key (AWS_ACCESS_KEY_ID)."
}

variable "aws_secret_access_key" {
  type        = string
  sensitive   = true
  description = "Output secret_access_key of deploy/state (AWS_SECRET_ACCESS_KEY)."
}

variable "modules_digitalocean_token" {
  type        = string
  sensitive   = true
  description = "DigitalOcean token the droplet module uses (DIGITALOCEAN_TOKEN inside the app): a custom-scoped token with the droplet scopes only (README)."
}

variable "max_runs" {
  type        = number
  default     = 4
  description = "Terraform runs at once per instance (TFSERVER_MAX_RUNS); with engine sqs, per worker."

  validation {
    condition     = var.max_runs >= 1
    error_message = "At least one run."
  }
}

variable "run_timeout_seconds" {
  type        = number
  default     = 1800
  description = "Deadline of one request's terraform runs (TFSERVER_RUN_TIMEOUT)."

  validation {
    condition     = var.run_timeout_seconds >= 10
    error_message = "At least 10 seconds."
  }
}

variable "lock_wait_seconds" {
  type        = number
  default     = 30
  description = "How long a run waits for a busy instance (TFSERVER_LOCK_WAIT)."

  validation {
    condition     = var.lock_wait_seconds >= 0
    error_message = "Zero or more seconds."
  }
}

variable "policy_file" {
  type        = string
  default     = "/app/policy.toml"
  description = "Governance policy inside the image (TFSERVER_POLICY); the Dockerfile copies deploy/policy.toml there."

  validation {
    condition     = startswith(var.policy_file, "/")
    error_message = "Give the policy's absolute path inside the image."
  }
}

variable "trusted_proxies" {
  type        = list(string)
  default     = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
  description = "Addresses or CIDRs whose X-Forwarded-For tfserver believes (TFSERVER_TRUSTED_PROXIES): App Platform's edge, which reaches the container from private addresses (unverified: see README)."

  validation {
    condition     = length(var.trusted_proxies) > 0 && alltrue([for p in var.trusted_proxies : can(cidrhost(strcontains(p, "/") ? p : (strcontains(p, ":") ? "${p}/128" : "${p}/32"), 0))])
    error_message = "Give IPv4 or IPv6 addresses or CIDRs, at least one."
  }
}
