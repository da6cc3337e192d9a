//go:build race

package batch

// underRace is set when the tests run under the race detector, which
// makes every operation several times slower: tests that show a figure
// at scale run smaller there.
const underRace = true
