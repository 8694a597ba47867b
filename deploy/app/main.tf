# tfserver on DigitalOcean App Platform: the image, at least two instances behind the
# platform's load balancer (they share state and locks in S3), a health check, secrets as
# SECRET env vars, and a custom domain for which App Platform obtains and renews a Let's
# Encrypt (ACME) certificate and terminates TLS.

terraform {
  required_version = ">= 1.10"

  required_providers {
    digitalocean = {
      source  = "digitalocean/digitalocean"
      version = "~> 2.44"
    }
  }
}

# Reads DIGITALOCEAN_TOKEN from the environment of whoever runs this stack.
provider "digitalocean" {}

locals {
  # Settings tfserver reads (see README: Configuration), wired from deploy/state and
  # deploy/auth outputs.
  plain_env = {
    TFSERVER_HOST           = "0.0.0.0"
    TFSERVER_PORT           = "8000"
    TFSERVER_AUTH           = "jwt"
    COGNITO_ISSUER          = var.cognito_issuer
    JWK_URL                 = var.jwks_url
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
  }
  secret_env = {
    AWS_ACCESS_KEY_ID     = var.aws_access_key_id
    AWS_SECRET_ACCESS_KEY = var.aws_secret_access_key
    DIGITALOCEAN_TOKEN    = var.modules_digitalocean_token
  }
}

resource "digitalocean_app" "tfserver" {
  spec {
    name   = var.app_name
    region = var.region

    domain {
      name = var.domain
      type = "PRIMARY"
      zone = var.dns_zone
    }

    service {
      name               = "tfserver"
      instance_count     = var.instance_count
      instance_size_slug = var.instance_size_slug
      http_port          = 8000

      image {
        registry_type = var.image_registry_type
        registry      = var.image_registry
        repository    = var.image_repository
        tag           = var.image_tag
      }

      health_check {
        http_path             = "/healthz"
        initial_delay_seconds = 10
        period_seconds        = 10
        timeout_seconds       = 5
        failure_threshold     = 3
      }

      dynamic "env" {
        for_each = local.plain_env
        content {
          key   = env.key
          value = env.value
          scope = "RUN_TIME"
          type  = "GENERAL"
        }
      }

      dynamic "env" {
        for_each = nonsensitive(toset([for k, v in local.secret_env : k if v != null]))
        content {
          key   = env.value
          value = local.secret_env[env.value]
          scope = "RUN_TIME"
          type  = "SECRET"
        }
      }
    }
  }
}
