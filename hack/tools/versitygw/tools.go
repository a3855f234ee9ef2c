//go:build tools

// Package tools pins the versitygw S3 server command that hack/build-tools.sh builds.
package tools

import _ "github.com/versity/versitygw/cmd/versitygw"
