# tfserver on DigitalOcean App Platform: the image, at least two instances behind the
# platform's load balancer (they share state and locks in S3), readiness on /readyz and
# liveness on /healthz, the environment of env.tf with credentials as SECRET env vars, and a
# custom domain for which App Platform obtains and renews a Let's Encrypt (ACME) certificate
# and terminates TLS. With engine = "sqs", a worker component beside the service runs
# what the service queues (docs/deploy.md, step 10).

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

      # Readiness: traffic (and a rolling deploy's switch-over) only once terraform is
      # found, the state store answers and every module is initialised.
      health_check {
        http_path             = "/readyz"
        initial_delay_seconds = 10
        period_seconds        = 10
        timeout_seconds       = 5
        success_threshold     = 1
        failure_threshold     = 3
      }

      # Liveness: restart an instance whose process stopped answering. /healthz needs
      # nothing outside the process, so a slow state store never restarts the fleet.
      liveness_health_check {
        http_path             = "/healthz"
        initial_delay_seconds = 30
        period_seconds        = 10
        timeout_seconds       = 5
        success_threshold     = 1
        failure_threshold     = 6
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
        for_each = local.service_engine_env
        content {
          key   = env.key
          value = env.value
          scope = "RUN_TIME"
          type  = "GENERAL"
        }
      }

      dynamic "env" {
        for_each = toset(keys(local.secret_env))
        content {
          key   = env.value
          value = local.secret_env[env.value]
          scope = "RUN_TIME"
          type  = "SECRET"
        }
      }
    }

    # The sqs engine's workers: the same image and environment as the service, run as
    # `tfserver worker`. A worker takes runs from the queue and serves only /healthz and
    # /readyz (no route reaches it from outside), so App Platform checks its liveness on
    # the port tfserver listens on and restarts a worker that stopped answering.
    dynamic "worker" {
      for_each = var.engine == "sqs" ? ["tfserver-worker"] : []
      content {
        name               = worker.value
        instance_count     = var.worker_count
        instance_size_slug = var.worker_size_slug
        # tini (the image's PID 1) named again: whether App Platform's run command
        # keeps the image's ENTRYPOINT or replaces it, an init reaps what runs orphan
        # (-s: as a child subreaper when it is not PID 1).
        run_command = "/usr/bin/tini -s -- tfserver worker"

        image {
          registry_type = var.image_registry_type
          registry      = var.image_registry
          repository    = var.image_repository
          tag           = var.image_tag
        }

        liveness_health_check {
          http_path             = "/healthz"
          port                  = 8000
          initial_delay_seconds = 30
          period_seconds        = 10
          timeout_seconds       = 5
          success_threshold     = 1
          failure_threshold     = 6
        }

        # SIGTERM (a deploy, a scale-down) makes a worker stop taking messages and finish
        # or hand back what it holds within TFSERVER_SHUTDOWN_GRACE; SIGKILL comes after.
        termination {
          grace_period_seconds = var.worker_grace_seconds
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
          for_each = local.worker_engine_env
          content {
            key   = env.key
            value = env.value
            scope = "RUN_TIME"
            type  = "GENERAL"
          }
        }

        dynamic "env" {
          for_each = toset(keys(local.secret_env))
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
}
