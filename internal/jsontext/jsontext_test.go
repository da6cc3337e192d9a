package jsontext

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
		out := AppendString(append([]byte(nil), prefix...), s)
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
	if got := string(AppendString(nil, "é€😀 </>&\u2028")); got != `"é€😀 </>&`+"\u2028"+`"` {
		t.Errorf("valid UTF-8 changed: %s", got)
	}
	if got := string(AppendString(nil, "a\"b\\c\nd\x01")); got != `"a\"b\\c\nd\u0001"` {
		t.Errorf("escapes: %s", got)
	}
}

func TestCheck(t *testing.T) {
	deep := strings.Repeat("[", 65) + strings.Repeat("]", 65)
	for _, c := range []struct {
		in      string
		problem string
		commas  int
	}{
		{`[1,2,3]`, "", 2},
		{`[[1,2],{"a":1,"b":[3,4]}]`, "", 1},
		{`{"a":"x,y"}`, "", 0},
		{`"[,,]"`, "", 0},
		{`[1,2`, "is not valid JSON", 0},
		{"[\"\xff\"]", "is not valid UTF-8", 0},
		{deep, "nests JSON deeper than 64 levels", 0},
		{strings.Repeat("[", 64) + strings.Repeat("]", 64), "", 0},
	} {
		problem, commas := Check([]byte(c.in), 64)
		if problem != c.problem || commas != c.commas {
			t.Errorf("Check(%.40q) = %q, %d; want %q, %d", c.in, problem, commas, c.problem, c.commas)
		}
	}
}

func TestSplitTop(t *testing.T) {
	for _, c := range []struct {
		in   string
		want []string
	}{
		{``, nil},
		{`{"a":1}`, []string{`{"a":1}`}},
		{`{"a":[1,2]},{"b":"x,}"},3`, []string{`{"a":[1,2]}`, `{"b":"x,}"}`, `3`}},
	} {
		got := SplitTop([]byte(c.in))
		if len(got) != len(c.want) {
			t.Fatalf("SplitTop(%q) = %q, want %q", c.in, got, c.want)
		}
		for i := range got {
			if string(got[i]) != c.want[i] {
				t.Errorf("SplitTop(%q)[%d] = %q, want %q", c.in, i, got[i], c.want[i])
			}
		}
	}
}

func TestDepthWithin(t *testing.T) {
	for _, c := range []struct {
		in    string
		limit int
		want  bool
	}{
		{`[[[]]]`, 3, true},
		{`[[[]]]`, 2, false},
		{`["[[[[[["]`, 1, true},
		{`["\"[[[["]`, 1, true},
		{`]]]][[`, 2, true},
	} {
		if got := DepthWithin([]byte(c.in), c.limit); got != c.want {
			t.Errorf("DepthWithin(%q, %d) = %v", c.in, c.limit, got)
		}
	}
}
