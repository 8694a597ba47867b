# tfserver's identity provider: a Cognito user pool with a domain (for /oauth2/token), a
# resource server whose scopes follow tfserver's rules (<prefix>/<module>.read and .write
# per module, <prefix>/admin), and an app client for the client-credentials grant.

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

locals {
  module_scopes = flatten([for m in var.modules : ["${m}.read", "${m}.write"]])
  client_scopes = [for s in coalesce(var.client_scopes, local.module_scopes) : "${var.scope_prefix}/${s}"]
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
}

resource "aws_cognito_user_pool_client" "this" {
  name                                 = var.client_name
  user_pool_id                         = aws_cognito_user_pool.this.id
  generate_secret                      = true
  allowed_oauth_flows                  = ["client_credentials"]
  allowed_oauth_flows_user_pool_client = true
  allowed_oauth_scopes                 = local.client_scopes
  supported_identity_providers         = ["COGNITO"]
  access_token_validity                = var.access_token_minutes

  token_validity_units {
    access_token = "minutes"
  }

  depends_on = [aws_cognito_resource_server.this]
}
