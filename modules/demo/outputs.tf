output "id" {
  description = "ID of the demo resource."
  value       = terraform_data.demo.id
}

output "message" {
  description = "A greeting built from the inputs."
  value       = "${var.greeting}, ${var.name}!"
}

output "replicas" {
  description = "The replica count."
  value       = var.replicas
}

output "settings" {
  description = "The effective settings, defaults filled in."
  value       = var.settings
}

output "tags" {
  description = "The labels."
  value       = var.tags
}

output "password_digest" {
  description = "SHA-256 of the password, marked sensitive."
  value       = one(terraform_data.secret[*].output)
  sensitive   = true
}
