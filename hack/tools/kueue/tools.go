//go:build tools

// Package tools pins the Kueue controller manager that hack/build-tools.sh builds.
package tools

import _ "sigs.k8s.io/kueue/cmd/kueue"
