output "issuer" {
  description = "Token issuer (COGNITO_ISSUER)."
  value       = local.issuer
}

output "jwks_url" {
  description = "Signing keys (JWK_URL)."
  value       = "${local.issuer}/.well-known/jwks.json"
}

output "token_url" {
  description = "Client-credentials token endpoint (TFSERVER_TOKEN_URL for `tfserver token`)."
  value       = "https://${aws_cognito_user_pool_domain.this.domain}.auth.${var.region}.amazoncognito.com/oauth2/token"
}

output "user_pool_id" {
  description = "ID of the user pool."
  value       = aws_cognito_user_pool.this.id
}

output "modules" {
  description = "The modules whose scopes the resource server defines."
  value       = local.served_modules
}

output "scopes" {
  description = "Every scope the resource server defines."
  value       = aws_cognito_resource_server.this.scope_identifiers
}

output "admin_client_id" {
  description = "The admin client's ID (TFSERVER_CLIENT_ID of the operator)."
  value       = aws_cognito_user_pool_client.admin.id
}

output "admin_client_secret" {
  description = "The admin client's secret (TFSERVER_CLIENT_SECRET of the operator)."
  value       = aws_cognito_user_pool_client.admin.client_secret
  sensitive   = true
}

output "tenant_client_ids" {
  description = "Each tenant's client ID, by tenant name."
  value       = { for t, c in aws_cognito_user_pool_client.tenant : t => c.id }
}

output "tenant_client_secrets" {
  description = "Each tenant's client secret, by tenant name: hand each to its tenant only."
  value       = { for t, c in aws_cognito_user_pool_client.tenant : t => c.client_secret }
  sensitive   = true
}

output "client_ids" {
  description = "Every client allowed to call tfserver, admin first (TFSERVER_CLIENT_IDS)."
  value       = local.client_ids
}

output "app_inputs" {
  description = "deploy/app's variables that come from this stack: `terraform output -json app_inputs > ../app/auth.auto.tfvars.json`."
  value = {
    cognito_issuer = local.issuer
    jwks_url       = "${local.issuer}/.well-known/jwks.json"
    token_url      = "https://${aws_cognito_user_pool_domain.this.domain}.auth.${var.region}.amazoncognito.com/oauth2/token"
    client_ids     = local.client_ids
    scope_prefix   = var.scope_prefix
  }
}

output "env" {
  description = "tfserver's settings for this pool as `export K='V'` lines (no secret): `terraform output -raw env`."
  value       = module.env.text
}
