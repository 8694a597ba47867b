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

output "queue_url" {
  description = "URL of the sqs engine's FIFO queue (TFSERVER_QUEUE_URL)."
  value       = aws_sqs_queue.runs.url
}

output "queue_arn" {
  description = "ARN of the sqs engine's FIFO queue (the runtime user's RunQueue statement)."
  value       = aws_sqs_queue.runs.arn
}

output "queue_name" {
  description = "Name of the FIFO queue (the QueueName dimension of its CloudWatch metrics)."
  value       = aws_sqs_queue.runs.name
}

output "dead_letter_queue_url" {
  description = "URL of the dead-letter queue: runs that could never run (docs/deploy.md, step 11)."
  value       = aws_sqs_queue.dead_letters.url
}

output "dead_letter_queue_arn" {
  description = "ARN of the dead-letter queue."
  value       = aws_sqs_queue.dead_letters.arn
}

output "runtime_user_arn" {
  description = "The IAM user tfserver runs as."
  value       = aws_iam_user.runtime.arn
}

output "tfserver_policy_json" {
  description = "The runtime user's policy: the bucket's key prefix, the lock table and the run queue, nothing else."
  value       = data.aws_iam_policy_document.tfserver.json
}

# The runtime user's access key. Sensitive: `terraform output` prints it only when named,
# and README pipes it straight into deploy/app's apply (TF_VAR_*), never into a file.
output "access_key_id" {
  description = "Runtime user's access key ID (AWS_ACCESS_KEY_ID of the app, a SECRET there)."
  value       = aws_iam_access_key.runtime.id
  sensitive   = true
}

output "secret_access_key" {
  description = "Runtime user's secret access key (AWS_SECRET_ACCESS_KEY of the app, a SECRET there)."
  value       = aws_iam_access_key.runtime.secret
  sensitive   = true
}

output "app_inputs" {
  description = "deploy/app's variables that come from this stack: `terraform output -json app_inputs > ../app/state.auto.tfvars.json`."
  value = {
    state_bucket     = aws_s3_bucket.state.id
    state_region     = var.region
    state_lock_table = aws_dynamodb_table.locks.name
    state_key_prefix = var.key_prefix
    queue_url        = aws_sqs_queue.runs.url
  }
}

output "env" {
  description = "tfserver's settings for this state store as `export K='V'` lines (no secret): `terraform output -raw env`."
  value       = module.env.text
}
