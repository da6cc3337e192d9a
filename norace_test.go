//go:build !race

package batch

// underRace: see race_test.go.
const underRace = false
