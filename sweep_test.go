package batch

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// Job directories without a readable record are swept once everything in
// them is older than the retention.
func TestAsyncSweepsJobsWithoutRecord(t *testing.T) {
	storage := t.TempDir()
	fsys := &certmagic.FileStorage{Path: storage}
	fresh, noRecord, badRecord := strings.Repeat("0", 32), strings.Repeat("1", 32), strings.Repeat("2", 32)
	for _, k := range []string{
		jobKey(fresh, "results", "000000"),
		jobKey(noRecord, "results", "000000"),
		jobKey(badRecord, "job"),
	} {
		if err := fsys.Store(context.Background(), k, []byte("{")); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-2 * time.Hour)
	for _, id := range []string{noRecord, badRecord} {
		_ = filepath.WalkDir(filepath.Join(storage, "batch", "jobs", id), func(p string, _ fs.DirEntry, err error) error {
			if err == nil {
				err = os.Chtimes(p, old, old)
			}
			return err
		})
	}
	startCaddy(t, "batch /batch /batch/* {\n\tasync {\n\t\tretention 1h\n\t}\n}\nrespond 404", inStorage(storage))
	eventually(t, 10*time.Second, "old job directories swept", func() bool {
		_, err1 := os.Stat(filepath.Join(storage, "batch", "jobs", noRecord))
		_, err2 := os.Stat(filepath.Join(storage, "batch", "jobs", badRecord))
		return errors.Is(err1, fs.ErrNotExist) && errors.Is(err2, fs.ErrNotExist)
	})
	if _, err := os.Stat(filepath.Join(storage, "batch", "jobs", fresh)); err != nil {
		t.Errorf("a recent job directory was swept: %v", err)
	}
}
