package batch

import (
	"bytes"
	"encoding/json"
	"math/rand"
	"strings"
	"testing"
	"unicode/utf8"
)

// appendString must write valid JSON that reads back as json.Marshal's
// string would: invalid UTF-8 becomes U+FFFD, byte for byte.
func TestAppendString(t *testing.T) {
	check := func(s string) {
		t.Helper()
		prefix := []byte(`{"k":`)
		out := appendString(append([]byte(nil), prefix...), s)
		if !bytes.HasPrefix(out, prefix) {
			t.Fatalf("%q: prefix lost: %q", s, out)
		}
		out = out[len(prefix):]
		if !json.Valid(out) {
			t.Fatalf("%q: not valid JSON: %q", s, out)
		}
		if !utf8.Valid(out) {
			t.Fatalf("%q: output is not valid UTF-8: %q", s, out)
		}
		var got, want string
		if err := json.Unmarshal(out, &got); err != nil {
			t.Fatalf("%q: %v", s, err)
		}
		std, _ := json.Marshal(s)
		if err := json.Unmarshal(std, &want); err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Fatalf("%q: reads back as %q, json.Marshal's as %q", s, got, want)
		}
	}
	fixed := []string{
		"", "plain", `"quoted"`, `back\slash`, "\x00\x01\x1f\x7f", "\n\r\t\b\f", "</script>&<>",
		"é€😀", "\u2028\u2029", "\ufffd", "\xff", "a\xffb", "\xc3", "\xc3(", "\xe2\x82", "\xed\xa0\x80", "\xed\xbf\xbf",
		"\xc0\xaf", "\xf4\x8f\xbf\xbf", "\xf4\x90\x80\x80", "\xf8\x88\x80\x80\x80", "\x80\x80", "€\xe2\x82",
		strings.Repeat("\\\"", 100), strings.Repeat("\xff", 100),
	}
	for _, s := range fixed {
		check(s)
	}
	// Random strings, weighted towards the bytes that need care.
	rng := rand.New(rand.NewSource(1))
	special := []byte{0, 1, 0x1f, 0x20, '"', '\\', '/', '<', '>', '&', 0x7f, 0x80, 0xbf, 0xc0, 0xc2, 0xdf, 0xe0, 0xe2, 0xed, 0xef, 0xf0, 0xf4, 0xf5, 0xff}
	for range 20000 {
		b := make([]byte, rng.Intn(24))
		for i := range b {
			if rng.Intn(3) == 0 {
				b[i] = special[rng.Intn(len(special))]
			} else {
				b[i] = byte(rng.Intn(256))
			}
		}
		check(string(b))
	}
	// Valid UTF-8 is written as is, but for the escapes JSON needs.
	if got := string(appendString(nil, "é€😀 </>&\u2028")); got != `"é€😀 </>&`+"\u2028"+`"` {
		t.Errorf("valid UTF-8 changed: %s", got)
	}
	if got := string(appendString(nil, "a\"b\\c\nd\x01")); got != `"a\"b\\c\nd\u0001"` {
		t.Errorf("escapes: %s", got)
	}
}
