output "bucket" {
  description = "State bucket (TF_STATE_BUCKET)."
  value       = aws_s3_bucket.state.id
}

output "region" {
  description = "Region of the bucket (TF_STATE_REGION)."
  value       = var.region
}

output "lock_table" {
  description = "DynamoDB lock table (TF_STATE_LOCK_TABLE)."
  value       = aws_dynamodb_table.locks.name
}

output "key_prefix" {
  description = "Key prefix (TF_STATE_KEY_PREFIX)."
  value       = var.key_prefix
}

output "tfserver_env" {
  description = "tfserver's settings for this state store, ready to export."
  value = {
    TFSERVER_BACKEND      = "s3"
    TF_STATE_BUCKET       = aws_s3_bucket.state.id
    TF_STATE_REGION       = var.region
    TF_STATE_KEY_PREFIX   = var.key_prefix
    TF_STATE_LOCK_TABLE   = aws_dynamodb_table.locks.name
    TF_STATE_USE_LOCKFILE = "true"
  }
}

output "tfserver_policy_json" {
  description = "Least-privilege IAM policy for the credentials tfserver uses."
  value       = data.aws_iam_policy_document.tfserver.json
}
