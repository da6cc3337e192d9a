package batch

import (
	"slices"
	"strings"
	"testing"
	"time"
)

func TestQueueNames(t *testing.T) {
	rec := jobRecord{progress: progress{ID: strings.Repeat("ab", 16), CreatedAt: time.Unix(1700000000, 123456789)},
		Owner: "v2:0123", ExpiresAt: time.Unix(1700086400, 5)}
	name := queueName(rec)
	q, ok := parseQueued(name)
	if !ok || q.id != rec.ID || !q.created.Equal(rec.CreatedAt) || !q.expires.Equal(rec.ExpiresAt) || q.owner != ownerToken(rec.Owner) {
		t.Fatalf("%s read back as %+v, %v", name, q, ok)
	}
	if q.key() != queueKey(rec) {
		t.Errorf("key %s, want %s", q.key(), queueKey(rec))
	}
	// Names sort by owner, then age.
	later := rec
	later.CreatedAt = rec.CreatedAt.Add(time.Hour * 24 * 365 * 30)
	if queueName(later) <= name {
		t.Errorf("%s sorts before %s", queueName(later), name)
	}
	for _, bad := range []string{
		"", "123", name + ".x", strings.Replace(name, ".", "", 1),
		"zzzzzzzzzzzzzzzz" + name[16:],       // owner not hex
		name[:17] + "x" + name[18:],          // created not a number
		name[:len(name)-1] + "g",             // id not hex
		name[:17] + "-" + name[18:],          // negative
		"0123456789abcdef.1.2." + rec.ID,     // fields not fixed in width
		"." + strings.Repeat("0", 70) + ".x", // nothing in its place
	} {
		if q, ok := parseQueued(bad); ok {
			t.Errorf("%q read as %+v", bad, q)
		}
	}
}

// The jobs waiting are served in a round over their owners, from the owner
// after the one served last, each owner's jobs oldest first.
func TestQueueRounds(t *testing.T) {
	at := func(s int) time.Time { return time.Unix(1700000000+int64(s), 0) }
	job := func(owner string, created int, id string) queued {
		return queued{owner: owner, created: at(created), id: strings.Repeat(id, 32)}
	}
	// a's jobs came first, then b's, then c's: first come, first served
	// would run all of a's before any other.
	waiting := []queued{job("b", 5, "4"), job("a", 1, "1"), job("c", 7, "6"), job("a", 3, "3"), job("b", 6, "5"), job("a", 2, "2")}
	order := func(r *rounds) (got []string) {
		for {
			q, ok := r.next()
			if !ok {
				return got
			}
			got = append(got, q.owner+q.id[:1])
		}
	}
	cases := []struct {
		turn string
		want []string
	}{
		{"", []string{"a1", "b4", "c6", "a2", "b5", "a3"}},
		{"a", []string{"b4", "c6", "a1", "b5", "a2", "a3"}},
		{"b", []string{"c6", "a1", "b4", "a2", "b5", "a3"}},
		{"c", []string{"a1", "b4", "c6", "a2", "b5", "a3"}},
		{"bb", []string{"c6", "a1", "b4", "a2", "b5", "a3"}}, // an owner with nothing waiting
		{"z", []string{"a1", "b4", "c6", "a2", "b5", "a3"}},
	}
	for _, tc := range cases {
		if got := order(newRounds(waiting, tc.turn)); !slices.Equal(got, tc.want) {
			t.Errorf("after %q: %v, want %v", tc.turn, got, tc.want)
		}
	}

	// An owner whose next job cannot start now is passed over for the
	// rest of the look: its later jobs must not start before it.
	r := newRounds(waiting, "")
	q, _ := r.next() // a1 cannot start
	r.skip(q.owner)
	if got := order(r); !slices.Equal(got, []string{"b4", "c6", "b5"}) {
		t.Errorf("with a's first job waiting: %v", got)
	}
	// A job that was none to run gives its turn to its owner's next.
	r = newRounds(waiting, "")
	r.next() // a1 was none to run
	r.again()
	if got := order(r); !slices.Equal(got, []string{"a2", "b4", "c6", "a3", "b5"}) {
		t.Errorf("with a's first job passed: %v", got)
	}
	// Jobs of one owner created at once keep an order: by id.
	tie := newRounds([]queued{job("a", 1, "9"), job("a", 1, "8")}, "")
	if got := order(tie); !slices.Equal(got, []string{"a8", "a9"}) {
		t.Errorf("jobs created at once: %v", got)
	}
}
