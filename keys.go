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

// keyTurns hands out the turns of keys: at most limit operations of one
// key run at once, and they start in the order they are offered. Only the
// keys with an operation running or waiting have an entry, so that its
// memory follows what is in flight and waiting, whatever the number of
// keys a job holds: at most one entry per operation the scheduler has
// taken and not finished, which its window (a job's) or its batch bounds.
type keyTurns struct {
	limit int
	keys  map[string]*keyLine
}

// keyLine is one key's operations that run and wait.
type keyLine struct {
	running int
	waiting []int // in the order offered
}

func newKeyTurns(limit int) *keyTurns {
	return &keyTurns{limit: limit, keys: map[string]*keyLine{}}
}

// offer reports whether operation i, of key k, may start now; if not, it
// waits, and done hands it its turn. A key's operations must be offered
// in the order they were submitted.
func (kt *keyTurns) offer(k string, i int) bool {
	l := kt.keys[k]
	if l == nil {
		l = new(keyLine)
		kt.keys[k] = l
	}
	if l.running < kt.limit && len(l.waiting) == 0 {
		l.running++
		return true
	}
	l.waiting = append(l.waiting, i)
	return false
}

// done ends an operation of key k that ran, and returns the operation
// its turn passes to, which may start now, or -1 for none.
func (kt *keyTurns) done(k string) int {
	l := kt.keys[k]
	if len(l.waiting) > 0 {
		i := l.waiting[0]
		l.waiting = l.waiting[1:]
		return i
	}
	if l.running--; l.running == 0 {
		delete(kt.keys, k)
	}
	return -1
}
