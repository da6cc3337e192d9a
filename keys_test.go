package batch

import (
	"context"
	"strings"
	"testing"
)

// key_concurrency: the handler's option, and the batch field that
// overrides it, bounded.
func TestKeyConcurrencyField(t *testing.T) {
	t.Parallel()
	h := handlerAlone(t, &Handler{KeyConcurrency: 3})
	for body, want := range map[string]int{
		`{"batch":[{"path":"/a","key":"k"}]}`:                       3,
		`{"key_concurrency":2,"batch":[{"path":"/a","key":"k"}]}`:   2,
		`{"key_concurrency":1e1,"batch":[{"path":"/a","key":"k"}]}`: 10,
	} {
		b, err := parseBatch(context.Background(), []byte(body), &h.rules)
		if err != nil {
			t.Fatalf("%s: %v", body, err)
		}
		if got := (&runner{h: h, b: b}).keyConcurrency(); got != want {
			t.Errorf("%s: key_concurrency %d, want %d", body, got, want)
		}
	}
	for _, bad := range []string{`0`, `-1`, `1.5`, `"2"`, `true`, `null`, `10001`, `1e100`} {
		_, err := parseBatch(context.Background(), []byte(`{"key_concurrency":`+bad+`,"batch":[{"path":"/a"}]}`), &h.rules)
		if err == nil || !strings.Contains(err.Error(), "key_concurrency must be a whole number from 1 to 10000") {
			t.Errorf("key_concurrency %s: %v", bad, err)
		}
	}
}
