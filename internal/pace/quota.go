package pace

import (
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// quota is what an answer's rate limit headers advertise.
type quota struct {
	remaining    int64         // requests left in the window
	reset        time.Duration // until the quota renews, from the answer
	limit        int64         // requests a window allows; 0 if unknown
	window       time.Duration // of the quota policy; 0 if unknown
	hasRemaining bool
	hasReset     bool
}

// Bounds of what rate limit headers are read from: longer values and
// more members are garbage, not quota.
const (
	maxQuotaHeaderLen = 512
	maxQuotaMembers   = 16
)

// parseQuota reads the rate limit headers of an answer, in the first of
// these forms it carries:
//
//   - RateLimit: "default";r=50;t=30 and RateLimit-Policy:
//     "default";q=100;w=60 (draft-ietf-httpapi-ratelimit-headers 08 on;
//     of several policies, the one with the fewest requests left);
//   - RateLimit: limit=100, remaining=50, reset=30 (drafts 06–07);
//   - RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset (drafts up
//     to 05);
//   - X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset.
//
// Reset is delta-seconds; a value that can only be a Unix time (from
// 1e9, or 1e12 in milliseconds) is read as one, and one more than a day
// away is ignored. Garbage is ignored; ok is false when nothing was read.
func parseQuota(h http.Header, now time.Time) (q quota, ok bool) {
	if v := quotaHeader(h, "Ratelimit"); v != "" {
		var name string
		q, name = parseStructured(v, now)
		if pv := quotaHeader(h, "Ratelimit-Policy"); pv != "" {
			q.limit, q.window = parsePolicy(pv, name)
		}
		if q.hasRemaining {
			return q, true
		}
	}
	for _, prefix := range [...]string{"Ratelimit-", "X-Ratelimit-"} {
		q = quota{}
		if n, ok := firstInt(quotaHeader(h, prefix+"Remaining")); ok {
			q.remaining, q.hasRemaining = n, true
		}
		if n, ok := firstInt(quotaHeader(h, prefix+"Limit")); ok {
			q.limit = n
		}
		if d, ok := resetAfter(firstMember(quotaHeader(h, prefix+"Reset")), now); ok {
			q.reset, q.hasReset = d, true
		}
		if q.hasRemaining {
			return q, true
		}
	}
	return quota{}, false
}

// quotaHeader is h's first value of name (canonical), "" if too long.
func quotaHeader(h http.Header, name string) string {
	vs := h[name]
	if len(vs) == 0 || len(vs[0]) > maxQuotaHeaderLen {
		return ""
	}
	return vs[0]
}

// members splits a list value at commas, at most maxQuotaMembers.
func members(v string) []string {
	return strings.SplitN(v, ",", maxQuotaMembers)
}

func firstMember(v string) string {
	m, _, _ := strings.Cut(v, ",")
	m, _, _ = strings.Cut(m, ";")
	return strings.TrimSpace(m)
}

// firstInt reads the first member of a list as a count: "100" and
// "100, 100;w=60" are 100.
func firstInt(v string) (int64, bool) {
	return parseCount(firstMember(v))
}

// parseCount reads a non-negative integer of at most 15 digits.
func parseCount(s string) (int64, bool) {
	s = strings.TrimSpace(s)
	if s == "" || len(s) > 15 || strings.Trim(s, "0123456789") != "" {
		return 0, false
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil
}

// parseStructured reads a RateLimit field: a list of policies with r
// and t parameters (draft 08 on), or a dictionary of limit, remaining
// and reset (drafts 06–07); name is the policy read of a list.
func parseStructured(v string, now time.Time) (q quota, name string) {
	for _, m := range members(v) {
		item, params, _ := strings.Cut(m, ";")
		item = strings.TrimSpace(item)
		if key, val, isDict := strings.Cut(item, "="); isDict && !strings.HasPrefix(item, `"`) {
			// Draft 06–07 dictionary member.
			switch strings.TrimSpace(key) {
			case "remaining":
				if n, ok := parseCount(val); ok {
					q.remaining, q.hasRemaining = n, true
				}
			case "limit":
				if n, ok := parseCount(val); ok {
					q.limit = n
				}
			case "reset":
				if d, ok := resetAfter(strings.TrimSpace(val), now); ok {
					q.reset, q.hasReset = d, true
				}
			}
			continue
		}
		// A policy: r requests left, renewed in t seconds.
		var p quota
		for param := range strings.SplitSeq(params, ";") {
			key, val, _ := strings.Cut(param, "=")
			switch strings.TrimSpace(key) {
			case "r":
				if n, ok := parseCount(val); ok {
					p.remaining, p.hasRemaining = n, true
				}
			case "t":
				if d, ok := resetAfter(strings.TrimSpace(val), now); ok {
					p.reset, p.hasReset = d, true
				}
			}
		}
		if p.hasRemaining && (!q.hasRemaining || p.remaining < q.remaining) {
			q.remaining, q.hasRemaining, q.reset, q.hasReset = p.remaining, true, p.reset, p.hasReset
			name = item
		}
	}
	return q, name
}

// parsePolicy reads a RateLimit-Policy field: of its policies, the one
// named name (the one RateLimit tells the quota left of), or else the
// one with the fewest requests (q) per window (w).
func parsePolicy(v, name string) (limit int64, window time.Duration) {
	for _, m := range members(v) {
		item, params, _ := strings.Cut(m, ";")
		var q int64
		var w time.Duration
		for param := range strings.SplitSeq(params, ";") {
			key, val, _ := strings.Cut(param, "=")
			switch strings.TrimSpace(key) {
			case "q":
				q, _ = parseCount(val)
			case "w":
				if n, ok := parseCount(val); ok && n <= int64(MaxRetryAfter/time.Second) {
					w = time.Duration(n) * time.Second
				}
			}
		}
		if q > 0 && name != "" && strings.TrimSpace(item) == name {
			return q, w
		}
		if q > 0 && (limit == 0 || q < limit) {
			limit, window = q, w
		}
	}
	return limit, window
}

// resetAfter reads a reset value: delta-seconds, possibly with a
// fraction, or a Unix time in seconds (from 1e9) or milliseconds (from
// 1e12); at most a day from now.
func resetAfter(s string, now time.Time) (time.Duration, bool) {
	if s == "" || len(s) > 20 || strings.Trim(s, "0123456789.") != "" {
		return 0, false
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsNaN(f) || math.IsInf(f, 0) || f < 0 {
		return 0, false
	}
	secs := f
	switch {
	case f >= 1e12:
		secs = f/1e3 - float64(now.UnixNano())/1e9
	case f >= 1e9:
		secs = f - float64(now.UnixNano())/1e9
	}
	if secs > MaxRetryAfter.Seconds() {
		return 0, false
	}
	return time.Duration(max(secs, 0) * float64(time.Second)), true
}

// MaxRetryAfter caps what a Retry-After may ask for: no answer is a reason
// to wait longer, and more seconds than this could overflow a Duration.
const MaxRetryAfter = 24 * time.Hour

// retryAfter reads a Retry-After header, delta-seconds or an HTTP-date, as
// a wait from now of at most MaxRetryAfter; ok is false when there is none
// or it cannot be read.
func RetryAfter(h http.Header) (wait time.Duration, ok bool) {
	v := strings.TrimSpace(h.Get("Retry-After"))
	if v == "" {
		return 0, false
	}
	if strings.Trim(v, "0123456789") == "" {
		// Only digits: ParseUint fails by range alone, which is long.
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil || n > uint64(MaxRetryAfter/time.Second) {
			return MaxRetryAfter, true
		}
		return time.Duration(n) * time.Second, true
	}
	if t, err := http.ParseTime(v); err == nil {
		return min(max(time.Until(t), 0), MaxRetryAfter), true
	}
	return 0, false
}
