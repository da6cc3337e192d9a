package pace

import (
	"crypto/sha256"
	"encoding/hex"
	"time"
)

// rateKeys are the token buckets of a rate, by key: at most max of them,
// those of keys beyond sharing one.
type rateKeys struct {
	n        float64       // tokens a bucket holds, and gains per interval
	interval time.Duration // of the refill
	max      int
	buckets  map[string]*bucket
	overflow bucket // of keys beyond max
	swept    time.Time
}

type bucket struct {
	tokens float64
	at     time.Time // when tokens was counted
}

func newRateKeys(n int, interval time.Duration, maxKeys int) *rateKeys {
	return &rateKeys{n: float64(n), interval: interval, max: maxKeys, buckets: make(map[string]*bucket)}
}

// refill brings b's tokens to now, perSec more a second, up to capacity.
func (b *bucket) refill(now time.Time, perSec, capacity float64) {
	if d := now.Sub(b.at); d > 0 {
		b.tokens = min(capacity, b.tokens+perSec*d.Seconds())
		b.at = now
	}
}

// next is when b, refilled at perSec a second, has a token: a
// millisecond from now at least.
func (b *bucket) next(now time.Time, perSec float64) time.Time {
	wait := time.Duration((1 - b.tokens) / perSec * float64(time.Second))
	return now.Add(max(wait, time.Millisecond))
}

// perSec is the refill of the rate's buckets.
func (r *rateKeys) perSec() float64 { return r.n / r.interval.Seconds() }

// fill brings b's count of tokens to now; a new bucket is full.
func (r *rateKeys) fill(b *bucket, now time.Time) {
	if b.at.IsZero() {
		b.tokens, b.at = r.n, now
		return
	}
	b.refill(now, r.perSec(), r.n)
}

// bucket returns the bucket of key, making one if there is room: a full
// map drops its idle buckets (full again, so no different from new ones)
// at most once an interval, and otherwise sends new keys to the overflow.
func (r *rateKeys) bucket(key string, now time.Time) *bucket {
	if len(key) > maxRateKeyLen {
		sum := sha256.Sum256([]byte(key))
		key = hex.EncodeToString(sum[:16])
	}
	if b, ok := r.buckets[key]; ok {
		return b
	}
	if len(r.buckets) >= r.max && now.Sub(r.swept) >= r.interval {
		r.swept = now
		for k, b := range r.buckets {
			if r.fill(b, now); b.tokens >= r.n {
				delete(r.buckets, k)
			}
		}
	}
	if len(r.buckets) >= r.max {
		return &r.overflow
	}
	b := new(bucket)
	r.buckets[key] = b
	return b
}

// allows reports whether key has a token now, or when it will.
func (r *rateKeys) allows(key string, now time.Time) (bool, time.Time) {
	b := r.bucket(key, now)
	r.fill(b, now)
	if b.tokens >= 1 {
		return true, time.Time{}
	}
	return false, b.next(now, r.perSec())
}

// take spends a token of key, which allows said it has.
func (r *rateKeys) take(key string, now time.Time) {
	b := r.bucket(key, now)
	r.fill(b, now)
	b.tokens--
}
