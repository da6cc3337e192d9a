package pace

import (
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestParseQuota(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	epoch := strconv.FormatInt(now.Unix()+30, 10)
	cases := []struct {
		name   string
		header http.Header
		want   quota
		ok     bool
	}{
		{"none", http.Header{}, quota{}, false},
		{"structured", http.Header{"Ratelimit": {`"default";r=50;t=30`}},
			quota{remaining: 50, reset: 30 * time.Second, hasRemaining: true, hasReset: true}, true},
		{"structured with policy", http.Header{"Ratelimit": {`"default";r=0;t=5`}, "Ratelimit-Policy": {`"default";q=100;w=60`}},
			quota{remaining: 0, reset: 5 * time.Second, limit: 100, window: time.Minute, hasRemaining: true, hasReset: true}, true},
		{"structured, the fewest left of two", http.Header{"Ratelimit": {`"hour";r=900;t=3000, "second";r=2;t=1`},
			"Ratelimit-Policy": {`"hour";q=1000;w=3600, "second";q=10;w=1`}},
			quota{remaining: 2, reset: time.Second, limit: 10, window: time.Second, hasRemaining: true, hasReset: true}, true},
		{"structured, the policy of the fewest left", http.Header{"Ratelimit": {`"burst";r=900;t=1, "daily";r=3;t=3000`},
			"Ratelimit-Policy": {`"burst";q=1000;w=1, "daily";q=10000;w=86400`}},
			quota{remaining: 3, reset: 3000 * time.Second, limit: 10000, window: 24 * time.Hour, hasRemaining: true, hasReset: true}, true},
		{"structured token name and spaces", http.Header{"Ratelimit": {` default ; r = 7 ; t = 2 `}},
			quota{remaining: 7, reset: 2 * time.Second, hasRemaining: true, hasReset: true}, true},
		{"structured without t", http.Header{"Ratelimit": {`"default";r=3`}},
			quota{remaining: 3, hasRemaining: true}, true},
		{"draft 07 dictionary", http.Header{"Ratelimit": {`limit=100, remaining=50, reset=30`}},
			quota{remaining: 50, reset: 30 * time.Second, limit: 100, hasRemaining: true, hasReset: true}, true},
		{"old separate headers", http.Header{"Ratelimit-Limit": {"100, 100;w=60"}, "Ratelimit-Remaining": {"4"}, "Ratelimit-Reset": {"12"}},
			quota{remaining: 4, reset: 12 * time.Second, limit: 100, hasRemaining: true, hasReset: true}, true},
		{"x-ratelimit delta", http.Header{"X-Ratelimit-Limit": {"60"}, "X-Ratelimit-Remaining": {"0"}, "X-Ratelimit-Reset": {"1.5"}},
			quota{remaining: 0, reset: 1500 * time.Millisecond, limit: 60, hasRemaining: true, hasReset: true}, true},
		{"x-ratelimit epoch", http.Header{"X-Ratelimit-Remaining": {"9"}, "X-Ratelimit-Reset": {epoch}},
			quota{remaining: 9, reset: 30 * time.Second, hasRemaining: true, hasReset: true}, true},
		{"x-ratelimit epoch ms", http.Header{"X-Ratelimit-Remaining": {"9"}, "X-Ratelimit-Reset": {epoch + "000"}},
			quota{remaining: 9, reset: 30 * time.Second, hasRemaining: true, hasReset: true}, true},
		{"epoch past", http.Header{"X-Ratelimit-Remaining": {"9"}, "X-Ratelimit-Reset": {"1600000000"}},
			quota{remaining: 9, hasRemaining: true, hasReset: true}, true},
		{"epoch far off ignored", http.Header{"X-Ratelimit-Remaining": {"9"}, "X-Ratelimit-Reset": {"4000000000"}},
			quota{remaining: 9, hasRemaining: true}, true},
		{"delta over a day ignored", http.Header{"Ratelimit-Remaining": {"9"}, "Ratelimit-Reset": {"999999"}},
			quota{remaining: 9, hasRemaining: true}, true},
		{"garbage structured falls back", http.Header{"Ratelimit": {`"x";r=-1;t=zz`}, "X-Ratelimit-Remaining": {"3"}},
			quota{remaining: 3, hasRemaining: true}, true},
		{"negative remaining", http.Header{"X-Ratelimit-Remaining": {"-3"}}, quota{}, false},
		{"huge remaining", http.Header{"X-Ratelimit-Remaining": {"99999999999999999999"}}, quota{}, false},
		{"remaining word", http.Header{"Ratelimit-Remaining": {"lots"}}, quota{}, false},
		{"reset NaN", http.Header{"Ratelimit-Remaining": {"1"}, "Ratelimit-Reset": {"NaN"}}, quota{remaining: 1, hasRemaining: true}, true},
		{"reset negative", http.Header{"Ratelimit-Remaining": {"1"}, "Ratelimit-Reset": {"-5"}}, quota{remaining: 1, hasRemaining: true}, true},
		{"reset dots", http.Header{"Ratelimit-Remaining": {"1"}, "Ratelimit-Reset": {"1.2.3"}}, quota{remaining: 1, hasRemaining: true}, true},
		{"too long", http.Header{"Ratelimit-Remaining": {"1" + strings.Repeat(" ", maxQuotaHeaderLen)}}, quota{}, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, ok := parseQuota(c.header, now)
			if ok != c.ok || got != c.want {
				t.Errorf("parseQuota(%v) = %+v, %v; want %+v, %v", c.header, got, ok, c.want, c.ok)
			}
		})
	}
}

// Random bytes and mangled forms never panic, and what they yield is in
// range.
func TestParseQuotaGarbage(t *testing.T) {
	now := time.Now()
	rng := rand.New(rand.NewPCG(1, 2))
	alphabet := []byte(`0123456789.,;=" -abcdefqrtwxyzNaInf` + "\x00\xff\t")
	names := []string{"Ratelimit", "Ratelimit-Policy", "Ratelimit-Remaining", "Ratelimit-Reset", "Ratelimit-Limit",
		"X-Ratelimit-Remaining", "X-Ratelimit-Reset", "X-Ratelimit-Limit", "Retry-After"}
	seeds := []string{`"default";r=50;t=30`, `limit=100, remaining=50, reset=30`, `"a";q=1;w=1`, `1e400`, `;;;,,,==`, `r=`, `"`, `t=1e9`}
	for range 20000 {
		h := http.Header{}
		for _, name := range names {
			if rng.IntN(2) == 0 {
				continue
			}
			var b []byte
			if rng.IntN(3) == 0 {
				b = []byte(seeds[rng.IntN(len(seeds))])
			}
			for range rng.IntN(40) {
				b = append(b, alphabet[rng.IntN(len(alphabet))])
			}
			h[name] = []string{string(b)}
		}
		q, ok := parseQuota(h, now)
		if !ok {
			continue
		}
		if q.remaining < 0 || q.reset < 0 || q.reset > MaxRetryAfter || q.limit < 0 || q.window < 0 {
			t.Fatalf("%v read as %+v", h, q)
		}
	}
}

func FuzzParseQuota(f *testing.F) {
	f.Add(`"default";r=50;t=30`, `"default";q=100;w=60`, "5", "1700000000")
	f.Add(`limit=1, remaining=0, reset=2`, "", "", "0.5")
	f.Fuzz(func(t *testing.T, rl, policy, remaining, reset string) {
		h := http.Header{"Ratelimit": {rl}, "Ratelimit-Policy": {policy}, "X-Ratelimit-Remaining": {remaining}, "X-Ratelimit-Reset": {reset}}
		q, ok := parseQuota(h, time.Now())
		if ok && (q.remaining < 0 || q.reset < 0 || q.reset > MaxRetryAfter) {
			t.Fatalf("%v read as %+v", h, q)
		}
	})
}

func TestRetryAfterParse(t *testing.T) {
	future := time.Now().Add(90 * time.Second).UTC().Format(http.TimeFormat)
	cases := []struct {
		value string
		wait  time.Duration // 0 with ok false: none or unreadable
		ok    bool
	}{
		{"", 0, false},
		{"0", 0, true},
		{" 7 ", 7 * time.Second, true},
		{"86400", MaxRetryAfter, true},
		{"86401", MaxRetryAfter, true},
		{"9223372037", MaxRetryAfter, true},
		{"18446744074", MaxRetryAfter, true},
		{"99999999999999999999999", MaxRetryAfter, true},
		{"-5", 0, false},
		{"1.5", 0, false},
		{"soon", 0, false},
		{"Wed, 21 Oct 2015 07:28:00 GMT", 0, true}, // past
		{"Fri, 31 Dec 9999 23:59:59 GMT", MaxRetryAfter, true},
	}
	for _, c := range cases {
		wait, ok := RetryAfter(http.Header{"Retry-After": {c.value}})
		if wait != c.wait || ok != c.ok {
			t.Errorf("Retry-After %q: %v %v, want %v %v", c.value, wait, ok, c.wait, c.ok)
		}
	}
	if wait, ok := RetryAfter(http.Header{"Retry-After": {future}}); !ok || wait < 80*time.Second || wait > 90*time.Second {
		t.Errorf("an HTTP-date 90s ahead: %v %v", wait, ok)
	}
}
