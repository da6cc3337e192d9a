package batch

// Per-key ordering (SPEC §14): operations with the same "key" run at most
// key_concurrency at once, and start in the order they were submitted;
// operations without a key are not held back. For APIs that lock a
// parent record while one of its children is written, or allow a few
// requests at once per mailbox. A sequential batch runs one operation at
// a time in order, which keeps every key's order already.

// maxKeyConcurrency bounds the batch field key_concurrency: no batch
// runs more operations at once than that.
const maxKeyConcurrency = 10000

// keyConcurrency is how many operations of one key of the batch rn runs
// may run at once.
func (rn *runner) keyConcurrency() int {
	if n := rn.b.keyConcurrency; n > 0 {
		return n
	}
	return max(rn.h.KeyConcurrency, 1)
}
