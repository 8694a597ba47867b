variable "region" {
  type        = string
  description = "AWS region of the bucket and the table, such as eu-west-1."

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.region))
    error_message = "The region must be an AWS region name such as eu-west-1."
  }
}

variable "bucket_name" {
  type        = string
  description = "Name of the state bucket (globally unique)."

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "The bucket name must be 3-63 lowercase letters, digits, dots or dashes."
  }
}

variable "lock_table_name" {
  type        = string
  default     = "tfserver-locks"
  description = "Name of the DynamoDB lock table."

  validation {
    condition     = can(regex("^[A-Za-z0-9_.-]{3,255}$", var.lock_table_name))
    error_message = "The table name must be 3-255 letters, digits, dots, dashes or underscores."
  }
}

variable "key_prefix" {
  type        = string
  default     = "tfserver"
  description = "Key prefix under which tfserver keeps everything (TF_STATE_KEY_PREFIX); the runtime user may touch nothing else."

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9_/-]*[A-Za-z0-9]$", var.key_prefix))
    error_message = "The prefix must be letters, digits, dashes, underscores or slashes."
  }
}

variable "runtime_user_name" {
  type        = string
  default     = "tfserver-runtime"
  description = "Name of the IAM user tfserver runs as (its access key goes to the app)."

  validation {
    condition     = can(regex("^[A-Za-z0-9+=,.@_-]{1,64}$", var.runtime_user_name))
    error_message = "IAM user names are 1-64 letters, digits and +=,.@_- characters."
  }
}

variable "noncurrent_version_days" {
  type        = number
  default     = 90
  description = "Days an overwritten or deleted object's old version is kept before it expires."

  validation {
    condition     = var.noncurrent_version_days >= 1 && floor(var.noncurrent_version_days) == var.noncurrent_version_days
    error_message = "Keep old versions at least one whole day."
  }
}

variable "force_destroy" {
  type        = bool
  default     = false
  description = "Allow destroy to delete a bucket that still holds state (tests only)."
}

variable "queue_name" {
  type        = string
  default     = "tfserver-runs"
  description = "Name of the sqs engine's FIFO queue, without .fifo; the dead-letter queue is <name>-dlq.fifo."

  validation {
    condition     = can(regex("^[A-Za-z0-9_-]{1,71}$", var.queue_name))
    error_message = "Queue names are 1-71 letters, digits, dashes or underscores (SQS adds -dlq.fifo within its 80)."
  }
}

variable "queue_visibility_timeout_seconds" {
  type        = number
  default     = 60
  description = "How long a received message stays hidden unless its worker says otherwise (workers extend it while a run lasts)."

  validation {
    condition     = var.queue_visibility_timeout_seconds >= 30 && var.queue_visibility_timeout_seconds <= 43200 && floor(var.queue_visibility_timeout_seconds) == var.queue_visibility_timeout_seconds
    error_message = "Between 30 seconds and 12 hours, whole seconds."
  }
}

variable "queue_retention_seconds" {
  type        = number
  default     = 345600
  description = "How long a run's message waits in the queue before SQS drops it (default 4 days)."

  validation {
    condition     = var.queue_retention_seconds >= 3600 && var.queue_retention_seconds <= 1209600 && floor(var.queue_retention_seconds) == var.queue_retention_seconds
    error_message = "Between an hour and 14 days, whole seconds."
  }
}

variable "max_receive_count" {
  type        = number
  default     = 5
  description = "Receives of one message before it moves to the dead-letter queue: more than 1 + TFSERVER_RESUME_LOST, plus room for workers that hand a message back on SIGTERM."

  validation {
    condition     = var.max_receive_count >= 3 && var.max_receive_count <= 1000 && floor(var.max_receive_count) == var.max_receive_count
    error_message = "Between 3 and 1000 receives: a run needs one, a resume after a lost worker another."
  }
}
