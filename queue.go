package batch

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"
)

// The cluster's queue. A job that any instance can run waits for a worker
// in storage, not in the memory of the instance that took it: one key
// each, batch/queue/<owner>.<created>.<expires>.<id>, which says all that
// choosing the next job needs. Every instance with a worker free lists the
// queue (one call, whatever it holds: a look with Q jobs queued
// cluster-wide is one List returning Q names) and starts the next job
// (a round over owners, each owner's jobs oldest first) once it has taken
// it under the job's lock (about ten calls: its spec, the lock, the key
// still there, its holder and held keys, the queue key deleted, the
// unlock, its record). A job whose credentials live only in the memory
// of the instance that took it (spec.Local) cannot move: it waits in that
// process's memory, held by it, and joins the same round there.

const queuePrefix = "batch/queue"

// queued is a job waiting for a worker.
type queued struct {
	owner   string // ownerToken of the job's owner
	created time.Time
	expires time.Time // when its window ends: then it runs at once, skipping everything
	id      string
	// job is one waiting in this process's memory; nil for one in the
	// cluster's queue.
	job *job
}

// ownerToken names an owner in the queue's keys: a short hash of the
// owner's (already salted) hash, fixed in length and safe in a key.
func ownerToken(owner string) string {
	sum := sha256.Sum256([]byte(owner))
	return hex.EncodeToString(sum[:8])
}

// queueName is the key of the job rec in the queue, without the prefix:
// fixed-width fields, so that names sort by owner and then age.
func queueName(rec jobRecord) string {
	return fmt.Sprintf("%s.%019d.%019d.%s", ownerToken(rec.Owner), rec.CreatedAt.UnixNano(), rec.windowEnd().UnixNano(), rec.ID)
}

func queueKey(rec jobRecord) string { return path.Join(queuePrefix, queueName(rec)) }

// parseQueued reads a queue key's name; ok is false for a name that is
// none (a storage's temporary file, say).
func parseQueued(name string) (q queued, ok bool) {
	parts := strings.Split(name, ".")
	if len(parts) != 4 || len(parts[0]) != 16 || strings.Trim(parts[0], "0123456789abcdef") != "" ||
		len(parts[1]) != 19 || len(parts[2]) != 19 || !isJobID(parts[3]) {
		return q, false
	}
	created, err1 := strconv.ParseInt(parts[1], 10, 64)
	expires, err2 := strconv.ParseInt(parts[2], 10, 64)
	if err1 != nil || err2 != nil || created < 0 || expires < 0 {
		return q, false
	}
	return queued{owner: parts[0], created: time.Unix(0, created), expires: time.Unix(0, expires), id: parts[3]}, true
}

// key is where q waits in storage.
func (q queued) key() string {
	return path.Join(queuePrefix, fmt.Sprintf("%s.%019d.%019d.%s", q.owner, q.created.UnixNano(), q.expires.UnixNano(), q.id))
}

// enqueue puts a job that any instance can run in the cluster's queue;
// its record and operations must be stored first.
func (s *store) enqueue(ctx context.Context, rec jobRecord) error {
	return s.Store(ctx, queueKey(rec), []byte(rec.ID))
}

// rounds orders the jobs waiting: a round over owners, starting after the
// owner served last, each owner's jobs oldest first.
type rounds struct {
	owners []string // sorted
	jobs   map[string][]queued
	turn   string // the owner served last
	prev   string // the one before
}

func newRounds(waiting []queued, turn string) *rounds {
	r := &rounds{jobs: map[string][]queued{}, turn: turn}
	for _, q := range waiting {
		if r.jobs[q.owner] == nil {
			r.owners = append(r.owners, q.owner)
		}
		r.jobs[q.owner] = append(r.jobs[q.owner], q)
	}
	slices.Sort(r.owners)
	for _, jobs := range r.jobs {
		slices.SortFunc(jobs, func(a, b queued) int {
			if c := a.created.Compare(b.created); c != 0 {
				return c
			}
			return strings.Compare(a.id, b.id)
		})
	}
	return r
}

// next returns the oldest job of the owner whose turn it is, and makes
// that owner the one served last.
func (r *rounds) next() (queued, bool) {
	if len(r.owners) == 0 {
		return queued{}, false
	}
	i, _ := slices.BinarySearch(r.owners, r.turn)
	if i < len(r.owners) && r.owners[i] == r.turn {
		i++
	}
	owner := r.owners[i%len(r.owners)]
	q := r.jobs[owner][0]
	r.prev, r.turn = r.turn, owner
	if r.jobs[owner] = r.jobs[owner][1:]; len(r.jobs[owner]) == 0 {
		r.skip(owner)
	}
	return q, true
}

// again gives the turn taken by the last next back: its job was none to
// run, and its owner's next one goes in its place.
func (r *rounds) again() { r.turn = r.prev }

// skip passes over owner's jobs for the rest of the look: one of its jobs
// could not start, and the ones after it must not start before it.
func (r *rounds) skip(owner string) {
	if i, found := slices.BinarySearch(r.owners, owner); found {
		r.owners = slices.Delete(r.owners, i, i+1)
	}
	delete(r.jobs, owner)
}
