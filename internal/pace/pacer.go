package pace

import (
	"crypto/sha256"
	"encoding/hex"
	"math"
	"net/http"
	"time"
)

// The pacer is the gate's for adaptive operations: it learns the rate the
// API takes from its answers and spaces their starts at it.
//
// Until a first 429 it does not pace. That 429 pauses every adaptive
// operation for its Retry-After (the pacer knows nothing of the limit
// yet), and the pacer then ramps a rate up from what the API took in the
// last second, by half again every 100 ms, until the next 429: the rate
// the API took over the last half second, just before it, is the limit.
// From then on it paces a little below that, climbs back to the last
// limit within about a second of a 429, and probes beyond it, slowly at
// first. A 429
// while it paces lowers the rate by a twentieth; only the refused
// operation waits its Retry-After, unless it asks for more than a second,
// which pauses all of them again: the API's quota is spent. Either way,
// the 429s of operations sent before the last one was answered change
// nothing more: they report the same excess.
//
// A token bucket of the API, with whole-second Retry-After, is the case
// this is built for: pausing for every 429 would lose a second each time
// the rate is probed.
const (
	rampEvery    = 100 * time.Millisecond
	rampFactor   = 2.0
	paceBelow    = 0.95 // of the limit found
	regainPerSec = 0.05 // of the last limit, per second, below it
	probePerSec  = 0.02 // of the last limit, per second, beyond it, doubling each second
	minRate      = 0.1  // starts per second
	maxRate      = 1e6  // starts per second: beyond, the rate binds nothing
	// slowStartWait is the longest the first answer is waited for
	// before more operations start.
	slowStartWait = time.Second
	// pauseAllOver is the longest Retry-After that does not pause every
	// operation once a rate is learned.
	pauseAllOver = time.Second
	// paceBurst is how much of a second's starts may go at once.
	paceBurst = 20 * time.Millisecond
	slot      = 100 * time.Millisecond
)

// pacer is the state of adaptive pacing, under the gate's lock.
type pacer struct {
	usedAt      time.Time // of the last turn asked for
	startedAt   time.Time // of the last start
	peers       peers     // other instances pacing the same owner and API
	answered    bool      // an answer has come: until then, one operation at a time
	inflight    int       // adaptive operations in flight
	pausedUntil time.Time // no adaptive operation starts before
	decreasedAt time.Time // of the last 429 that changed the rate

	rate      float64 // starts per second; 0 until a 429
	limit     float64 // the rate at the last 429
	ramping   bool    // looking for the limit, after the first 429
	starts    bucket  // the tokens of the rate
	grownAt   time.Time
	probeFrom time.Time // when the rate passed the last limit
	boundAt   time.Time // when a start last waited for the rate

	accepted [10]int   // answers other than 429, per slot
	refused  [10]int   // 429s, per slot
	slotAt   time.Time // start of the newest slot

	quotaLeft  int64         // starts this instance's share of the advertised quota still allows
	quotaSpent bool          // the quota is spent by the API's own count
	quotaLimit int64         // the quota of a window, 0 if unknown
	quotaEvery time.Duration // the policy's window over its quota, 0 if unknown
	quotaReset time.Time     // when the quota renews; none known after
	nextStart  time.Time     // no adaptive operation starts before, as a low quota is spread
}

// admit reports whether an adaptive operation may start now; if not
// until some time, at says when. maxInflight bounds what a low quota is
// measured against.
func (p *pacer) admit(now time.Time, maxInflight int) (ok bool, at time.Time) {
	switch {
	case p.peers.fresh(now) && now.Before(p.peers.pausedUntil):
		return false, p.peers.pausedUntil // a peer was told to pause
	case !p.answered && p.inflight > 0 && now.Before(p.startedAt.Add(slowStartWait)):
		// Slow start: the first answer may tell the quota, which a
		// first flight as wide as max_inflight would overrun. An API
		// that tells nothing costs one round trip, or slowStartWait
		// for one that is slow to answer.
		return false, p.startedAt.Add(slowStartWait)
	case now.Before(p.pausedUntil):
		return false, p.pausedUntil
	case now.Before(p.quotaReset) && p.quotaLeft <= 0 && (p.quotaSpent || p.quotaEvery == 0):
		// Spent, by the API's own count: a window that renews at its
		// reset gives nothing before it.
		return false, p.quotaReset
	case now.Before(p.quotaReset) && p.quotaLow(maxInflight) && now.Before(p.nextStart):
		// A quota low, or this instance's share of it spent, goes at the
		// policy's rate: a token bucket refills all along, though its
		// reset is when it is full. No later than the reset, when the
		// spread no longer holds: a policy may spread one a day.
		if p.quotaReset.Before(p.nextStart) {
			return false, p.quotaReset
		}
		return false, p.nextStart
	}
	if p.rate > 0 {
		p.fill(now)
		if p.starts.tokens < 1 {
			p.boundAt = now
			return false, p.starts.next(now, p.rate)
		}
	}
	return true, time.Time{}
}

// quotaLow reports whether the quota left is low enough to be spread over
// the time to its reset rather than used at once: no more than one flight
// of operations, or a tenth of the limit.
func (p *pacer) quotaLow(maxInflight int) bool {
	return p.quotaLeft <= int64(maxInflight) || p.quotaLeft*10 <= p.quotaLimit
}

// start counts an adaptive operation that admit let start.
func (p *pacer) start(now time.Time, maxInflight int) {
	p.inflight++
	p.startedAt = now
	if now.Before(p.quotaReset) {
		if p.quotaLow(maxInflight) {
			// Spread over the time to the reset, but no slower than the
			// policy's own rate: a token bucket's reset is when it is
			// full again, though it refills all along.
			every := p.quotaReset.Sub(now) / time.Duration(max(p.quotaLeft, 1))
			if p.quotaEvery > 0 && (p.quotaLeft <= 0 || p.quotaEvery < every) {
				every = time.Duration(float64(p.quotaEvery) / paceBelow) // a little below: a bucket kept near empty answers "spent"
			}
			// From the last start's slot, so that timers firing late do
			// not add up; an idle spell gives no credit beyond one start.
			from := p.nextStart
			if from.Before(now.Add(-every)) {
				from = now
			}
			p.nextStart = from.Add(every)
		}
		p.quotaLeft--
	}
	if p.rate > 0 {
		p.starts.tokens--
	}
}

// fill brings the rate's tokens to now: at most paceBurst's worth, and
// at least one, so that a rate below one a second still starts.
func (p *pacer) fill(now time.Time) {
	p.starts.refill(now, p.rate, max(1, p.rate*paceBurst.Seconds()))
}

// What an answer changed of the pacer, for the metrics and the log.
const (
	EventPaused = "paused" // every adaptive operation, for a Retry-After
	EventSlowed = "slowed" // the rate was lowered
)

// learn adapts the pacer to the answer of an operation started at
// grantedAt (status 0: none came), and says what it changed: "" for
// nothing the metrics count.
func (p *pacer) learn(grantedAt time.Time, status int, h http.Header, now time.Time) (event string) {
	p.inflight--
	p.answered = true // with no answer too: an API that does not answer is not waited for twice
	if status == 0 {
		return ""
	}
	q, ok := parseQuota(h, now)
	if ok {
		renews := q.reset
		if !q.hasReset {
			renews = q.window
		}
		// The quota is the owner's, which its peers spend too: this
		// instance takes its share.
		n := int64(p.peers.flows(now))
		p.quotaLeft = q.remaining/n - int64(p.inflight) // those in flight may not be counted yet
		p.quotaSpent = q.remaining <= 0
		p.quotaLimit = q.limit / n
		p.quotaEvery = 0
		if q.limit > 0 && q.window > 0 {
			p.quotaEvery = q.window * time.Duration(n) / time.Duration(q.limit)
		}
		p.quotaReset = time.Time{} // no telling when it renews: not paced on
		if renews > 0 {
			p.quotaReset = now.Add(min(renews, maxPause))
		}
	}
	refused := refusal(status, h)
	p.count(now, refused)
	if !refused {
		p.grow(now)
		return ""
	}
	if grantedAt.Before(p.decreasedAt) {
		return "" // sent before the last 429 was answered
	}
	p.decreasedAt = now
	pause, ok := RetryAfter(h)
	switch {
	case ok:
	case q.hasRemaining && q.remaining == 0 && q.hasReset:
		pause = q.reset
	default:
		pause = defaultPause
	}
	pause = min(pause, maxPause)
	switch {
	case p.rate == 0:
		// This instance's share of what the API took in the last
		// second, or one a second: the ramp starts there once the
		// pause ends.
		p.rate = min(maxRate, max(1, p.share(now, p.acceptedRate(now, len(p.accepted)))))
		p.ramping = true
	default:
		// Down to its share of what the API took of the last slots'
		// starts: all of it beyond its limit was refused.
		if p.ramping {
			p.rate = min(p.rate, p.share(now, p.acceptedRate(now, 2)))
		}
		p.limit = max(minRate, p.rate)
		if p.peers.fresh(now) {
			// Peers send too: the limit is this instance's share of what
			// the API took from all, however much of it this one got.
			p.limit = max(minRate, p.share(now, p.acceptedRate(now, len(p.accepted))))
		}
		p.rate = max(minRate, min(p.rate, p.limit)*min(paceBelow, max(0.5, p.tookShare(now))))
		p.ramping = false
	}
	p.starts = bucket{tokens: min(p.starts.tokens, 0), at: now}
	p.grownAt, p.probeFrom = now, time.Time{}
	if p.limit == 0 || pause > pauseAllOver {
		if until := now.Add(pause); until.After(p.pausedUntil) {
			// One starts as the pause ends, the next at the rate.
			p.pausedUntil = until
			p.starts = bucket{tokens: 1, at: until}
		}
		return EventPaused
	}
	return EventSlowed
}

// refusal reports whether an answer refused a request for its rate: a
// 429, or a 503 with Retry-After, an API too busy asking to come back
// later.
func refusal(status int, h http.Header) bool {
	return status == http.StatusTooManyRequests || status == http.StatusServiceUnavailable && h.Get("Retry-After") != ""
}

// grow raises the rate as answers succeed, while starts wait for it.
func (p *pacer) grow(now time.Time) {
	if p.rate == 0 || now.Before(p.pausedUntil) {
		return
	}
	from := p.grownAt
	if p.pausedUntil.After(from) {
		from = p.pausedUntil // no answer came in a pause
	}
	d := min(now.Sub(from), time.Second)
	if d < time.Millisecond {
		return
	}
	p.grownAt = now
	if now.Sub(p.boundAt) > time.Second {
		return // the rate is not what holds operations back
	}
	switch {
	case p.ramping:
		// Doubling at most at each answer: from a low rate, answers
		// are far apart.
		p.rate *= math.Pow(rampFactor, float64(min(d, rampEvery))/float64(rampEvery))
	case p.rate < p.limit:
		// Halving the gap every third of a second, and a twentieth of
		// the limit a second at least, to meet it.
		gain := max(regainPerSec*p.limit, 2*(p.limit-p.rate)) * d.Seconds()
		p.rate = min(p.limit, p.rate+gain)
	default:
		// Beyond the last limit, faster the longer it holds: the
		// limit found may be below the API's.
		if p.probeFrom.IsZero() {
			p.probeFrom = now
		}
		held := min(now.Sub(p.probeFrom), 10*time.Second)
		p.rate += probePerSec * math.Exp2(held.Seconds()) * p.limit * d.Seconds()
	}
	p.rate = min(p.rate, maxRate)
}

// count records an answer: refused, or taken.
func (p *pacer) count(now time.Time, refused bool) {
	p.advance(now)
	if refused {
		p.refused[0]++
	} else {
		p.accepted[0]++
	}
}

// tookShare is the share of the last two slots' answers the API took.
func (p *pacer) tookShare(now time.Time) float64 {
	p.advance(now)
	took := p.accepted[0] + p.accepted[1]
	return float64(took) / float64(took+p.refused[0]+p.refused[1])
}

// advance moves the slots to now: slot 0 is the one now is in.
func (p *pacer) advance(now time.Time) {
	if p.slotAt.IsZero() {
		p.slotAt = now
		return
	}
	n := int(now.Sub(p.slotAt) / slot)
	if n <= 0 {
		return
	}
	n = min(n, len(p.accepted))
	for _, s := range []*[10]int{&p.accepted, &p.refused} {
		copy(s[n:], s[:len(s)-n])
		clear(s[:n])
	}
	p.slotAt = p.slotAt.Add(time.Duration(int(now.Sub(p.slotAt)/slot)) * slot)
}

// acceptedRate is the answers the API took per second over the last n
// slots, the newest of which has only begun.
func (p *pacer) acceptedRate(now time.Time, n int) float64 {
	p.advance(now)
	n = min(n, len(p.accepted))
	c := 0
	for _, a := range p.accepted[:n] {
		c += a
	}
	over := time.Duration(n-1)*slot + now.Sub(p.slotAt)
	if p.pausedUntil.After(now.Add(-over)) {
		over = now.Sub(p.pausedUntil) // nothing was sent in a pause
	}
	return float64(c) / max(over, 10*time.Millisecond).Seconds()
}

// retryWait is how long an adaptive operation answered 429 waits before
// try attempt+1: to the end of any pause, and adaptiveBackoff at least.
// Its own Retry-After, if a second or less, is not waited out beyond
// that: it says to slow down, which the rate now does, and the operation
// goes again at its turn; a longer one paused all (learn).
func (p *pacer) retryWait(now time.Time, attempt int) time.Duration {
	return max(p.pausedUntil.Sub(now), adaptiveBackoff(attempt))
}

// RetryWait is how long an adaptive operation of o answered 429 waits
// before try attempt+1, now.
func (g *Gate) RetryWait(o *Owner, attempt int) time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	now := time.Now()
	return g.pacers.of(o.PaceKey, now).retryWait(now, attempt)
}

// peers is what the other instances pacing the same owner and API told
// through storage (Gate.SetPeers): how many send, how much the API took
// from them, and the latest pause one was told.
type peers struct {
	count       int
	accepted    float64 // answers a second
	pausedUntil time.Time
	at          time.Time
}

// peersStale is how long what peers told holds.
const peersStale = 3 * time.Second

func (ps *peers) fresh(now time.Time) bool { return ps.count > 0 && now.Sub(ps.at) < peersStale }

// flows counts the instances sending, this one included.
func (ps *peers) flows(now time.Time) int {
	if ps.fresh(now) {
		return 1 + ps.count
	}
	return 1
}

// setPeers takes what peers told. A limit learned while the others held
// more than their share rises to this instance's share of what the API
// takes now: an instance that came late is not held to what it was left
// then.
func (p *pacer) setPeers(ps peers, now time.Time) {
	p.peers = ps
	if p.rate == 0 {
		return
	}
	fair := p.share(now, p.acceptedRate(now, len(p.accepted)))
	if p.ramping {
		// A ramp that started from what this instance alone got, before
		// it knew its peers, goes on from its share.
		p.rate = min(maxRate, max(p.rate, fair*paceBelow))
		return
	}
	p.limit = max(p.limit, fair)
}

// share is this instance's share of what the API takes a second: own
// answers taken, and its peers'.
func (p *pacer) share(now time.Time, own float64) float64 {
	if !p.peers.fresh(now) {
		return own
	}
	return (own + p.peers.accepted) / float64(1+p.peers.count)
}

// pacers are the pacers of a gate by key, at most maxPacers of them:
// past it, idle ones are dropped, and keys beyond share one.
type pacers struct {
	m        map[string]*pacer
	overflow pacer
	swept    time.Time
}

const (
	maxPacers = 10000
	// idlePacer is how long a pacer nobody used is kept when the map is
	// full: what it learned is then stale.
	idlePacer = time.Minute
)

// of returns the pacer of key, making one if there is room.
func (ps *pacers) of(key string, now time.Time) *pacer {
	if len(key) > maxRateKeyLen {
		sum := sha256.Sum256([]byte(key))
		key = hex.EncodeToString(sum[:16])
	}
	p := ps.m[key]
	if p == nil {
		if ps.m == nil {
			ps.m = make(map[string]*pacer)
		}
		if len(ps.m) >= maxPacers && now.Sub(ps.swept) >= time.Second {
			ps.swept = now
			for k, q := range ps.m {
				if q.inflight == 0 && now.Sub(q.usedAt) > idlePacer && !now.Before(q.pausedUntil) {
					delete(ps.m, k)
				}
			}
		}
		if len(ps.m) >= maxPacers {
			p = &ps.overflow
		} else {
			p = new(pacer)
			ps.m[key] = p
		}
	}
	p.usedAt = now
	return p
}

// Learned is what a gate tells the other instances sharing its storage of
// one of its pacers, by its key: how much the API took a second from this
// instance, and until when it was told to pause.
type Learned struct {
	Key         string
	Accepted    float64
	PausedUntil time.Time
}

// Active returns what the pacers that have operations in flight or
// waiting, or started one in the last peersStale, learned: one held back
// is a peer too, or the others would take its share.
func (g *Gate) Active() []Learned {
	g.mu.Lock()
	defer g.mu.Unlock()
	now := time.Now()
	waiting := map[*pacer]bool{}
	for _, o := range g.ring {
		if o.Adaptive {
			waiting[g.pacers.of(o.PaceKey, now)] = true
		}
	}
	var out []Learned
	for k, p := range g.pacers.m {
		if p.inflight > 0 || waiting[p] || now.Sub(p.startedAt) < peersStale {
			out = append(out, Learned{Key: k, Accepted: p.acceptedRate(now, len(p.accepted)), PausedUntil: p.pausedUntil})
		}
	}
	return out
}

// SetPeers tells the pacer of key (as Active names it) what count other
// instances sending as its owner to its API learned.
func (g *Gate) SetPeers(key string, count int, accepted float64, pausedUntil time.Time) {
	g.mu.Lock()
	defer g.mu.Unlock()
	p := g.pacers.m[key]
	if p == nil {
		return
	}
	now := time.Now()
	p.setPeers(peers{count: count, accepted: accepted, pausedUntil: pausedUntil, at: now}, now)
	g.dispatch(now) // a pause that ended, or one that began
}
