# Test module: an S3 bucket with tags, against moto's server (tfserver passes terraform no
# AWS_ENDPOINT_URL* variable, so the endpoint is a variable). Its tags can be changed out
# of band with boto3: a drift check then finds them.

terraform {
  required_providers {
    aws = {
      source = "hashicorp/aws"
    }
  }
}

variable "endpoint" {
  type        = string
  description = "moto's URL."
}

variable "bucket" {
  type        = string
  description = "The bucket's name."
}

variable "tags" {
  type    = map(string)
  default = {}
}

provider "aws" {
  region                      = "us-east-1"
  s3_use_path_style           = true
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  skip_region_validation      = true

  endpoints {
    s3  = var.endpoint
    sts = var.endpoint
  }
}

resource "aws_s3_bucket" "this" {
  bucket = var.bucket
  tags   = var.tags
}

output "bucket" {
  value = aws_s3_bucket.this.bucket
}
