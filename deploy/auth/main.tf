# tfserver's identity provider: a Cognito user pool with a domain (for /oauth2/token), a
# resource server whose scopes follow tfserver's rules (<prefix>/<module>.read, .write and
# .approve for every served module, <prefix>/admin), one admin client, and one client-credentials client
# per tenant. Adding a tenant is adding an entry to var.tenants and applying; the app's
# TFSERVER_CLIENT_IDS comes from the client_ids output (see app_inputs).

terraform {
  required_version = ">= 1.10"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.100"
    }
  }
}

provider "aws" {
  region = var.region
}

resource "aws_cognito_user_pool" "this" {
  name = var.pool_name
}

resource "aws_cognito_user_pool_domain" "this" {
  domain       = var.domain_prefix
  user_pool_id = aws_cognito_user_pool.this.id
}

resource "aws_cognito_resource_server" "this" {
  identifier   = var.scope_prefix
  name         = "tfserver"
  user_pool_id = aws_cognito_user_pool.this.id

  scope {
    scope_name        = "admin"
    scope_description = "Every module, every tenant's instances, sensitive outputs, lock release"
  }

  dynamic "scope" {
    for_each = toset(local.module_scopes)
    content {
      scope_name        = scope.value
      scope_description = "tfserver module ${split(".", scope.value)[0]}: ${split(".", scope.value)[1]}"
    }
  }

  lifecycle {
    precondition {
      condition     = length(local.served_modules) > 0
      error_message = "No module found under ../../modules and none given in var.modules."
    }
    precondition {
      condition     = alltrue([for m in local.served_modules : can(regex("^[a-z0-9][a-z0-9_-]{0,62}$", m))])
      error_message = "Module names match ^[a-z0-9][a-z0-9_-]{0,62}$, as tfserver's URLs do."
    }
  }
}

# The operator's client: the admin scope (every module, every tenant, sensitive outputs,
# clearing a stuck lock).
resource "aws_cognito_user_pool_client" "admin" {
  name                                 = "${var.pool_name}-admin"
  user_pool_id                         = aws_cognito_user_pool.this.id
  generate_secret                      = true
  allowed_oauth_flows                  = ["client_credentials"]
  allowed_oauth_flows_user_pool_client = true
  allowed_oauth_scopes                 = local.admin_scopes
  supported_identity_providers         = ["COGNITO"]
  access_token_validity                = var.access_token_minutes

  token_validity_units {
    access_token = "minutes"
  }

  depends_on = [aws_cognito_resource_server.this]
}

# One client per tenant. tfserver keys a tenant's instances by the token's client_id, so a
# tenant keeps its map key: renaming one replaces its client and strands its instances.
resource "aws_cognito_user_pool_client" "tenant" {
  for_each = var.tenants

  name                                 = "${var.pool_name}-${each.key}"
  user_pool_id                         = aws_cognito_user_pool.this.id
  generate_secret                      = true
  allowed_oauth_flows                  = ["client_credentials"]
  allowed_oauth_flows_user_pool_client = true
  allowed_oauth_scopes                 = local.tenant_scopes[each.key]
  supported_identity_providers         = ["COGNITO"]
  access_token_validity                = var.access_token_minutes

  token_validity_units {
    access_token = "minutes"
  }

  depends_on = [aws_cognito_resource_server.this]
}

locals {
  issuer     = "https://cognito-idp.${var.region}.amazonaws.com/${aws_cognito_user_pool.this.id}"
  client_ids = concat([aws_cognito_user_pool_client.admin.id], [for t in sort(keys(var.tenants)) : aws_cognito_user_pool_client.tenant[t].id])
}

# The settings a tfserver needs to check this pool's tokens, as a file a shell can source.
module "env" {
  source = "../envfile"
  vars = {
    TFSERVER_AUTH         = "jwt"
    COGNITO_ISSUER        = local.issuer
    JWK_URL               = "${local.issuer}/.well-known/jwks.json"
    TFSERVER_CLIENT_IDS   = join(",", local.client_ids)
    TFSERVER_SCOPE_PREFIX = var.scope_prefix
  }
}
