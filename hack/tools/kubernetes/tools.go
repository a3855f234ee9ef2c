//go:build tools

// Package tools pins the control-plane commands that hack/build-tools.sh builds, kwok among
// them: kwok is built against the same k8s.io modules, so one build compiles the packages they
// share (592 of kwok's 758) once.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
