// Package lagstore is a Caddy storage module that puts Caddy's file system
// storage a simulated network away: caddy.storage.batch_lag waits a set
// latency (plus an optional random jitter) before every storage call, and
// counts the calls by method. http.handlers.batch_storage_calls answers the
// counts as JSON, so that a bench can read them from a Caddy running in a
// child process.
//
// It exists for tests and benches only: the batch module never imports it,
// so it is never linked into a production build; only tests and the bench
// command (bench/) do.
package lagstore

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
)

func init() { caddy.RegisterModule(Storage{}) }

// Storage is caddy.storage.batch_lag: Caddy's file system storage behind a
// simulated latency.
type Storage struct {
	// The directory the file system storage keeps its keys in. Required.
	Root string `json:"root,omitempty"`

	// How long every call (Store, Load, Delete, Exists, List, Stat, Lock,
	// Unlock) waits before it reaches the file system. Default: 0, no
	// wait; the calls are still counted.
	Latency caddy.Duration `json:"latency,omitempty"`

	// At most how much longer a call waits, drawn uniformly for each call.
	// Default: 0.
	Jitter caddy.Duration `json:"jitter,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (Storage) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "caddy.storage.batch_lag", New: func() caddy.Module { return new(Storage) }}
}

// Validate checks the configuration.
func (s *Storage) Validate() error {
	switch {
	case s.Root == "":
		return fmt.Errorf("batch_lag: root is required")
	case s.Latency < 0 || s.Jitter < 0:
		return fmt.Errorf("batch_lag: latency and jitter must not be negative")
	}
	return nil
}

// CertMagicStorage converts s to a certmagic.Storage instance.
func (s *Storage) CertMagicStorage() (certmagic.Storage, error) {
	return &store{fs: &certmagic.FileStorage{Path: s.Root}, latency: time.Duration(s.Latency), jitter: time.Duration(s.Jitter)}, nil
}

// method is a storage call, as counted.
type method int

const (
	callStore method = iota
	callLoad
	callDelete
	callExists
	callList
	callStat
	callLock
	callUnlock
	numMethods
)

// calls counts the calls of every batch_lag storage in the process, by
// method. Package-level state is fine here, in a module for tests and
// benches only: one process is one Caddy, or one test's.
var calls [numMethods]atomic.Int64

// Counts is a snapshot of the calls made, by method.
type Counts struct {
	// The calls of each method.
	Store  int64 `json:"store"`
	Load   int64 `json:"load"`
	Delete int64 `json:"delete"`
	Exists int64 `json:"exists"`
	List   int64 `json:"list"`
	Stat   int64 `json:"stat"`
	Lock   int64 `json:"lock"`
	Unlock int64 `json:"unlock"`
}

// Calls returns how many calls every batch_lag storage of this process has
// received so far, by method; a call counts as it starts waiting.
func Calls() Counts {
	return Counts{
		Store: calls[callStore].Load(), Load: calls[callLoad].Load(), Delete: calls[callDelete].Load(), Exists: calls[callExists].Load(),
		List: calls[callList].Load(), Stat: calls[callStat].Load(), Lock: calls[callLock].Load(), Unlock: calls[callUnlock].Load(),
	}
}

// Total is the number of calls, of every method.
func (c Counts) Total() int64 {
	return c.Store + c.Load + c.Delete + c.Exists + c.List + c.Stat + c.Lock + c.Unlock
}

// Sub is the calls made since before, a snapshot taken earlier.
func (c Counts) Sub(before Counts) Counts {
	return Counts{
		Store: c.Store - before.Store, Load: c.Load - before.Load, Delete: c.Delete - before.Delete,
		Exists: c.Exists - before.Exists, List: c.List - before.List, Stat: c.Stat - before.Stat,
		Lock: c.Lock - before.Lock, Unlock: c.Unlock - before.Unlock,
	}
}

// sleep waits d unless ctx ends first; a variable so that the tests see
// the waits without timing them.
var sleep = func(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// store is the certmagic.Storage of a batch_lag module.
type store struct {
	fs      *certmagic.FileStorage
	latency time.Duration
	jitter  time.Duration
}

// wait counts a call of m and waits before it. A call whose context ends
// while it waits returns the context's error and never reaches the file
// system, as a call to a remote storage would; with no wait configured, a
// call passes straight through.
func (s *store) wait(ctx context.Context, m method) error {
	calls[m].Add(1)
	d := s.latency
	if s.jitter > 0 {
		d += rand.N(s.jitter + 1)
	}
	if d <= 0 {
		return nil
	}
	return sleep(ctx, d)
}

func (s *store) Store(ctx context.Context, key string, value []byte) error {
	if err := s.wait(ctx, callStore); err != nil {
		return err
	}
	return s.fs.Store(ctx, key, value)
}

func (s *store) Load(ctx context.Context, key string) ([]byte, error) {
	if err := s.wait(ctx, callLoad); err != nil {
		return nil, err
	}
	return s.fs.Load(ctx, key)
}

func (s *store) Delete(ctx context.Context, key string) error {
	if err := s.wait(ctx, callDelete); err != nil {
		return err
	}
	return s.fs.Delete(ctx, key)
}

// Exists says false when the wait is cut short: it cannot tell.
func (s *store) Exists(ctx context.Context, key string) bool {
	if err := s.wait(ctx, callExists); err != nil {
		return false
	}
	return s.fs.Exists(ctx, key)
}

func (s *store) List(ctx context.Context, prefix string, recursive bool) ([]string, error) {
	if err := s.wait(ctx, callList); err != nil {
		return nil, err
	}
	return s.fs.List(ctx, prefix, recursive)
}

func (s *store) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	if err := s.wait(ctx, callStat); err != nil {
		return certmagic.KeyInfo{}, err
	}
	return s.fs.Stat(ctx, key)
}

func (s *store) Lock(ctx context.Context, name string) error {
	if err := s.wait(ctx, callLock); err != nil {
		return err
	}
	return s.fs.Lock(ctx, name)
}

func (s *store) Unlock(ctx context.Context, name string) error {
	if err := s.wait(ctx, callUnlock); err != nil {
		return err
	}
	return s.fs.Unlock(ctx, name)
}

func (s *store) String() string {
	return fmt.Sprintf("batch_lag(%s+%s):%s", s.latency, s.jitter, s.fs.Path)
}

// Interface guards
var (
	_ caddy.StorageConverter = (*Storage)(nil)
	_ caddy.Validator        = (*Storage)(nil)
	_ certmagic.Storage      = (*store)(nil)
)
