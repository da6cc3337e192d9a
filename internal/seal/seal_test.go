package seal

import (
	"bytes"
	"strings"
	"testing"
)

// key is 32 bytes in base64.
const key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="

func TestSealer(t *testing.T) {
	s, err := New([]string{key})
	if err != nil {
		t.Fatal(err)
	}
	sealed := s.Seal("batch/jobs/x/headers", []byte("secret"))
	if bytes.Contains(sealed, []byte("secret")) {
		t.Fatal("sealed data holds the plain text")
	}
	if plain, err := s.Open("batch/jobs/x/headers", sealed); err != nil || string(plain) != "secret" {
		t.Errorf("open: %q %v", plain, err)
	}
	if _, err := s.Open("batch/jobs/y/headers", sealed); err == nil {
		t.Error("sealed data moved to another key opens")
	}
	sealed[len(sealed)-1] ^= 1
	if _, err := s.Open("batch/jobs/x/headers", sealed); err == nil {
		t.Error("altered sealed data opens")
	}
	for _, bad := range []string{"", "short", strings.Repeat("0", 63), "{env.NOT_SET}"} {
		if _, err := New([]string{bad}); err == nil {
			t.Errorf("key %q accepted", bad)
		}
	}
}
