# tfserver's state infrastructure and the identity that uses it: the bucket that holds every
# module instance's state (and tfserver's inputs, run records, plans) under one key prefix,
# the DynamoDB table that locks it, the SQS FIFO queue the `sqs` run engine carries runs on
# (with its dead-letter queue), and the runtime IAM user whose only permissions are that
# prefix, that table and that queue. App Platform is not AWS and cannot assume a role, so
# the runtime identity is a user with an access key; the key goes to the app as a SECRET
# (docs/deploy.md).

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

resource "aws_s3_bucket" "state" {
  bucket        = var.bucket_name
  force_destroy = var.force_destroy
}

resource "aws_s3_bucket_versioning" "state" {
  bucket = aws_s3_bucket.state.id

  versioning_configuration {
    status = "Enabled"
  }
}

# Versions keep every state a run overwrote (a way back after a bad apply); under tfserver's
# prefix old ones go after a while, so run records and plans it deletes do not pile up.
resource "aws_s3_bucket_lifecycle_configuration" "state" {
  bucket = aws_s3_bucket.state.id

  rule {
    id     = "expire-old-versions"
    status = "Enabled"

    filter {
      prefix = "${var.key_prefix}/"
    }

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_days
    }
  }

  depends_on = [aws_s3_bucket_versioning.state]
}

resource "aws_s3_bucket_server_side_encryption_configuration" "state" {
  bucket = aws_s3_bucket.state.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_public_access_block" "state" {
  bucket                  = aws_s3_bucket.state.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_dynamodb_table" "locks" {
  name         = var.lock_table_name
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "LockID"

  attribute {
    name = "LockID"
    type = "S"
  }
}

# The `sqs` run engine's queue (docs/deploy.md, step 10). One message a run: the message
# group is the instance, so SQS hands out one run of an instance at a time, in order, to
# the whole fleet; tfserver sets every MessageDeduplicationId (the run id), so
# content-based deduplication stays off (two runs with the same body are still two runs).
# Both queues cost nothing while idle; with the default `local` engine they stay empty.
resource "aws_sqs_queue" "runs" {
  name                        = "${var.queue_name}.fifo"
  fifo_queue                  = true
  content_based_deduplication = false
  # Only a fallback: a worker asks for its own visibility on every receive and extends it
  # while terraform runs (its heartbeat), so this is how long a message stays hidden when
  # a worker that took it dies before its first heartbeat.
  visibility_timeout_seconds = var.queue_visibility_timeout_seconds
  message_retention_seconds  = var.queue_retention_seconds
  receive_wait_time_seconds  = 20
  sqs_managed_sse_enabled    = true

  # A message received max_receive_count times without being deleted (its run never
  # finished: a worker lost each time, or a message no worker can run) moves to the
  # dead-letter queue instead of coming back for ever.
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dead_letters.arn
    maxReceiveCount     = var.max_receive_count
  })
}

# FIFO, as a FIFO queue's dead-letter queue must be. It keeps messages for SQS's maximum,
# longer than the queue does, so a message moved there late is still there when someone
# looks.
resource "aws_sqs_queue" "dead_letters" {
  name                        = "${var.queue_name}-dlq.fifo"
  fifo_queue                  = true
  content_based_deduplication = false
  message_retention_seconds   = 1209600
  sqs_managed_sse_enabled     = true
}

# Only the run queue may move messages here.
resource "aws_sqs_queue_redrive_allow_policy" "dead_letters" {
  queue_url = aws_sqs_queue.dead_letters.id
  redrive_allow_policy = jsonencode({
    redrivePermission = "byQueue"
    sourceQueueArns   = [aws_sqs_queue.runs.arn]
  })
}

# What tfserver (and the terraform it runs) calls, and nothing more. Checked statement by
# statement in tests/test_deploy.py, allowed and denied calls alike.
data "aws_iam_policy_document" "tfserver" {
  # Terraform lists a module's workspaces under <prefix>/<module>/, tfserver lists its own
  # folders under <prefix>/: listing with any other prefix is refused.
  statement {
    sid       = "ListStatePrefix"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.state.arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.key_prefix}/*"]
    }
  }

  # s3:ListBucket for requests that carry no prefix at all. Two calls need it: HeadBucket
  # (tfserver's readiness check; its permission is s3:ListBucket, with no s3:prefix in the
  # request), and S3 answering 404 rather than 403 for a key that does not exist yet (it
  # does so only for callers allowed to list the bucket), which terraform and tfserver rely
  # on for new workspaces. The price: a listing without a prefix shows the names (never the
  # contents) of every key in this bucket, which is tfserver's own.
  statement {
    sid       = "BucketLevelChecks"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.state.arn]

    condition {
      test     = "Null"
      variable = "s3:prefix"
      values   = ["true"]
    }
  }

  # State, lock files, kept inputs, run records, event logs, saved plans, idempotency keys:
  # all under the prefix. Conditional writes (If-None-Match) need no other permission.
  statement {
    sid       = "ReadWriteUnderPrefix"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = ["${aws_s3_bucket.state.arn}/${var.key_prefix}/*"]
  }

  # Terraform's S3 backend keeps the default workspace's state at the bare `key`, outside
  # workspace_key_prefix: tfserver's backend settings make that terraform.tfstate at the
  # bucket's root, which `terraform init` reads (and finds missing: tfserver only ever uses
  # named workspaces). Reading it is all that is allowed there.
  statement {
    sid       = "DefaultWorkspaceProbe"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.state.arn}/terraform.tfstate"]
  }

  # Terraform's DynamoDB lock (and its state digest item), and tfserver reading who holds it.
  statement {
    sid       = "Locks"
    actions   = ["dynamodb:DescribeTable", "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:DeleteItem"]
    resources = [aws_dynamodb_table.locks.arn]
  }

  # The sqs engine's calls on its queue (tfserver/runs/sqs.py): an api replica sends, a
  # worker receives, extends (its heartbeat) or hands back, and deletes; both read the
  # queue's depth (readiness, metrics). The queue URL is configured (TFSERVER_QUEUE_URL),
  # so no GetQueueUrl; the dead-letter queue is the operator's, not tfserver's.
  statement {
    sid = "RunQueue"
    actions = ["sqs:SendMessage", "sqs:ReceiveMessage", "sqs:ChangeMessageVisibility",
    "sqs:DeleteMessage", "sqs:GetQueueAttributes"]
    resources = [aws_sqs_queue.runs.arn]
  }
}

resource "aws_iam_user" "runtime" {
  name = var.runtime_user_name
  path = "/tfserver/"
}

resource "aws_iam_user_policy" "runtime" {
  name   = "tfserver-state"
  user   = aws_iam_user.runtime.name
  policy = data.aws_iam_policy_document.tfserver.json
}

# The secret lands in this stack's state (as with any aws_iam_access_key): keep that state in
# the encrypted bucket (README step 3), never on a laptop or in git. Rotate by replacing it.
resource "aws_iam_access_key" "runtime" {
  user = aws_iam_user.runtime.name
}

# The settings a tfserver needs to use this store, as a file a shell can source.
module "env" {
  source = "../envfile"
  vars = {
    TFSERVER_BACKEND      = "s3"
    TF_STATE_BUCKET       = aws_s3_bucket.state.id
    TF_STATE_REGION       = var.region
    TF_STATE_KEY_PREFIX   = var.key_prefix
    TF_STATE_LOCK_TABLE   = aws_dynamodb_table.locks.name
    TF_STATE_USE_LOCKFILE = "true"
  }
}
