@echo off
rem ==========================================================================
rem  mcdeploy client launcher for Windows PE (kit version 1).
rem  Copy to <mount>\Windows\System32\startnet.cmd; see README.md beside it.
rem  UNTESTED on real WinPE (no Windows machines here): check it on yours.
rem  Keep CRLF line endings (deploy/winpe/.gitattributes asks git for them).
rem ==========================================================================
setlocal EnableExtensions

rem ---- site settings: edit these, or put "set NAME=value" lines in
rem      X:\mcdeploy\site.cmd, which is called if present.
rem DP agent control endpoint (HOST:PORT, the DP's MCDEPLOY_DP_CONTROL_HOST/PORT).
set "DP=192.0.2.10:47100"
rem Where the image is written: a file on a formatted partition (not X:, a RAM disk).
set "OUT=W:\mcdeploy\image.img"
rem Optional client id (default: the client agent's own choice).
set "MCD_ID="
rem Optional DESTRUCTIVE diskpart script run before receiving (e.g. X:\mcdeploy\diskpart.txt).
set "MCD_DISKPART="
rem Optional: after a verified receive of a WIM, apply this index to this directory.
set "MCD_APPLY_INDEX="
set "MCD_APPLY_DIR="
rem 1 = reboot after success.
set "MCD_REBOOT=0"
set "MCD_HOME=X:\mcdeploy"
if exist "%MCD_HOME%\site.cmd" call "%MCD_HOME%\site.cmd"
set "PY=%MCD_HOME%\python\python.exe"

echo [mcdeploy] initialising WinPE (wpeinit)
wpeinit

rem Multicast data arrives unsolicited on the session group/port: the WinPE firewall would
rem drop it. WinPE runs no services worth protecting; most deployment tools do the same.
wpeutil DisableFirewall >nul 2>&1

echo [mcdeploy] waiting for the network
wpeutil WaitForNetwork >nul 2>&1
set /a TRIES=0
:wait_ip
rem A real IPv4 address (English ipconfig output; 169.254.x.x = no DHCP answer yet).
ipconfig | findstr /r /c:"IPv4.*: [0-9]" | findstr /v /c:": 169.254." >nul && goto ip_ok
set /a TRIES+=1
if %TRIES% geq 60 goto no_network
ping -n 3 127.0.0.1 >nul
goto wait_ip

:ip_ok
ipconfig | findstr /c:"IPv4"

if not exist "%PY%" (
    echo [mcdeploy] FAILED: %PY% not found: the Python runtime is missing from this image.
    goto shell
)

if defined MCD_DISKPART (
    echo [mcdeploy] running diskpart /s %MCD_DISKPART%
    diskpart /s "%MCD_DISKPART%"
    if errorlevel 1 (
        echo [mcdeploy] FAILED: diskpart reported an error
        goto shell
    )
)

for %%F in ("%OUT%") do if not exist "%%~dpF" mkdir "%%~dpF"

set "ID_ARG="
if defined MCD_ID set "ID_ARG=--id %MCD_ID%"
echo [mcdeploy] receiving from %DP% into %OUT%
"%PY%" -m clientagent --dp %DP% --out "%OUT%" %ID_ARG%
set "RC=%ERRORLEVEL%"
if not "%RC%"=="0" (
    echo.
    echo [mcdeploy] FAILED: the client exited with code %RC%; its reason is printed above.
    goto shell
)
echo [mcdeploy] image received, verified ^(SHA-256^) and acknowledged: %OUT%

if defined MCD_APPLY_DIR (
    echo [mcdeploy] applying %OUT% index %MCD_APPLY_INDEX% to %MCD_APPLY_DIR%
    dism /Apply-Image /ImageFile:"%OUT%" /Index:%MCD_APPLY_INDEX% /ApplyDir:"%MCD_APPLY_DIR%"
    if errorlevel 1 (
        echo [mcdeploy] FAILED: dism /Apply-Image returned an error
        goto shell
    )
)

if "%MCD_REBOOT%"=="1" (
    echo [mcdeploy] done; rebooting
    wpeutil reboot
)
echo [mcdeploy] done
goto :eof

:no_network
echo [mcdeploy] FAILED: no IPv4 address after about 2 minutes (NIC driver? DHCP?)

:shell
echo [mcdeploy] staying in this command shell; fix the cause and run startnet.cmd again,
echo [mcdeploy] or "wpeutil reboot".
exit /b 1
