package batch

import (
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// otherKey is a second credentials_key, hex.
const otherKey = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0"

// findInFiles returns the files under dir that contain any of secrets.
func findInFiles(t *testing.T, dir string, secrets ...string) []string {
	t.Helper()
	var found []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		buf, err := os.ReadFile(p)
		if err != nil {
			return nil // gone meanwhile
		}
		for _, s := range secrets {
			if bytes.Contains(buf, []byte(s)) {
				found = append(found, strings.TrimPrefix(p, dir)+" holds "+s)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return found
}

// With a credentials key, storage never holds in clear what a job's
// operations inherit, nor its operations; the operations still reach the
// backend with them.
func TestCredentialsStoredEncrypted(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, proxySite(be, `{
		async {
			credentials_key `+testKey+`
		}
	}`), inStorage(storage))
	secrets := []string{"s3cr3t-token", "cookie-v4lue", "op-s3cret-key"}
	var ops []string
	for i := range 20 {
		ops = append(ops, fmt.Sprintf(`{"path":"/slow?d=20ms&id=c%d","headers":{"X-Api-Key":"op-s3cret-key"}}`, i))
	}
	status, _, body := send(t, "POST", base+"/batch", "["+strings.Join(ops, ",")+"]",
		"Authorization: Bearer s3cr3t-token", "Cookie: session=cookie-v4lue", "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("%d %s", status, body)
	}
	id := mustJSON(t, body).Get("id").String()
	eventually(t, 10*time.Second, "the job running", func() bool { return len(be.eventLog()) > 2 })
	if found := findInFiles(t, storage, secrets...); len(found) > 0 {
		t.Errorf("storage holds credentials in clear while the job runs: %v", found)
	}
	waitJob(t, base+"/batch/"+id, "Authorization: Bearer s3cr3t-token", "completed")
	if found := findInFiles(t, storage, secrets...); len(found) > 0 {
		t.Errorf("storage holds credentials in clear: %v", found)
	}
	for _, r := range be.requests() {
		if strings.HasPrefix(r.Path, "/slow") && (r.Header.Get("Authorization") != "Bearer s3cr3t-token" ||
			r.Header.Get("Cookie") != "session=cookie-v4lue" || r.Header.Get("X-Api-Key") != "op-s3cret-key") {
			t.Errorf("operation sent without its credentials: %v", r.Header)
		}
	}
}

// A job resumed under a key that does not open what it stored fails with
// a clear error, and sends nothing without its credentials; the old key
// kept beside a new one opens it.
func TestCredentialsWrongKeyFailsJob(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	port := freePort(t)
	cfg := func(keys string) []byte {
		return adapt(t, testCaddyfile(storage, port, "", proxySite(be, `{
		async {
			credentials_key `+keys+`
			lease 1s
		}
	}`)))
	}
	start := func(keys string) string {
		t.Helper()
		var ops []string
		for i := range 30 {
			ops = append(ops, fmt.Sprintf(`{"path":"/slow?d=30ms&id=w%d"}`, i))
		}
		base := loadCaddy(t, cfg(keys), port)
		id := submitJob(t, base+"/batch", "["+strings.Join(ops, ",")+"]")
		n := len(be.eventLog())
		eventually(t, 10*time.Second, "the job running", func() bool { return len(be.eventLog()) > n+4 })
		if err := caddy.Stop(); err != nil {
			t.Fatal(err)
		}
		return id
	}

	id := start(testKey)
	before := len(be.requests())
	base := loadCaddy(t, cfg(otherKey), port)
	p := waitJob(t, base+"/batch/"+id, alice, "completed", "error")
	if p.Get("status").String() != "error" || !strings.Contains(p.Get("error").String(), "cannot resume: cannot decrypt") ||
		!strings.Contains(p.Get("error").String(), "not configured") {
		t.Errorf("job resumed under the wrong key: %s", p.Raw)
	}
	if n := len(be.requests()); n != before {
		t.Errorf("%d operations sent after the key changed", n-before)
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}

	id = start(testKey)
	base = loadCaddy(t, cfg(otherKey+" "+testKey), port)
	if p := waitJob(t, base+"/batch/"+id, alice, "completed", "error"); p.Get("status").String() != "completed" || p.Get("succeeded").Int() != 30 {
		t.Errorf("job resumed with the old key kept: %s", p.Raw)
	}
}
