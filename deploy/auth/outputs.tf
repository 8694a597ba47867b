locals {
  issuer = "https://cognito-idp.${var.region}.amazonaws.com/${aws_cognito_user_pool.this.id}"
}

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

output "client_id" {
  description = "App client ID (TFSERVER_CLIENT_ID, and one of TFSERVER_CLIENT_IDS)."
  value       = aws_cognito_user_pool_client.this.id
}

output "client_secret" {
  description = "App client secret (TFSERVER_CLIENT_SECRET)."
  value       = aws_cognito_user_pool_client.this.client_secret
  sensitive   = true
}

output "scopes" {
  description = "Every scope the resource server defines."
  value       = aws_cognito_resource_server.this.scope_identifiers
}
